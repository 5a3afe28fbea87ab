"""The broker database's foundation: schema and migrations, row conversions, transactions.

One SQLite connection (WAL, ``check_same_thread=False``) behind a lock, since the gRPC service
calls in from worker threads; other processes (operator commands while ``serve`` runs) are
serialised by SQLite itself (writes use ``BEGIN IMMEDIATE`` and wait up to ``BUSY_TIMEOUT``).
The schema is created and migrated at open (``schema_version`` table, ``MIGRATIONS`` in order).
Every ``sqlite3.Error`` becomes ``StoreError`` here. Timestamps are stored as UTC ISO-8601 text
(fixed width, so they compare as text), PCR maps as JSON ``{"index": "hex"}``, labels and
selectors as canonical JSON (sorted keys, so equal selectors are equal text).

``kbs.store.Store`` is the public class; this module and ``kbs.store_catalog`` hold its parts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from kbs.errors import StoreError
from kbs.model import Node, NodeState, StoredKey

__all__ = [
    "BUSY_TIMEOUT",
    "MIGRATIONS",
    "Database",
    "dumps_map",
    "dumps_pcrs",
    "key_from_row",
    "loads_map",
    "loads_pcrs",
    "node_from_row",
    "opt_dt",
    "ts",
]


BUSY_TIMEOUT = 10.0

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE nodes (
            name TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'revoked')),
            labels TEXT NOT NULL DEFAULT '{}',
            ek_hash TEXT NOT NULL UNIQUE,
            ek_public BLOB NOT NULL,
            ek_certificate BLOB NOT NULL,
            ak_public BLOB NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            enrolled_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            last_attested_at TEXT,
            pcr_bank TEXT,
            pcrs TEXT NOT NULL DEFAULT '{}',
            reset_count INTEGER,
            restart_count INTEGER)""",
        """CREATE TABLE nonces (
            nonce BLOB PRIMARY KEY,
            node_name TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
            expires_at TEXT NOT NULL)""",
        "CREATE INDEX nonces_node ON nonces (node_name, expires_at)",
        """CREATE TABLE enrollments (
            id TEXT PRIMARY KEY,
            node_name TEXT NOT NULL,
            ek_public BLOB NOT NULL,
            ek_certificate BLOB NOT NULL,
            ak_public BLOB NOT NULL,
            ek_hash TEXT NOT NULL,
            secret_sha256 BLOB NOT NULL,
            metadata TEXT NOT NULL,
            expires_at TEXT NOT NULL)""",
        "CREATE INDEX enrollments_node ON enrollments (node_name, expires_at)",
        "CREATE TABLE allowlist (ek_hash TEXT PRIMARY KEY, added_at TEXT NOT NULL)",
        """CREATE TABLE keys (
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            algorithm TEXT NOT NULL,
            encrypted_private BLOB NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (name, version))""",
        """CREATE TABLE grants (
            key_name TEXT NOT NULL,
            selector TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (key_name, selector))""",
        """CREATE TABLE policies (
            name TEXT PRIMARY KEY,
            pcr_bank TEXT NOT NULL,
            pcrs TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE policy_assignments (
            policy_name TEXT NOT NULL REFERENCES policies(name) ON DELETE CASCADE,
            selector TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (policy_name, selector))""",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            event TEXT NOT NULL,
            node TEXT,
            result TEXT NOT NULL,
            detail TEXT NOT NULL)""",
        "CREATE INDEX audit_node ON audit (node, id)",
    ),
    (  # 2: the change feed behind the Watch stream (kbs.store_changes)
        """CREATE TABLE changes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            node TEXT,
            kind TEXT NOT NULL CHECK (kind IN ('revoked', 'changed')),
            reason TEXT NOT NULL)""",
        "CREATE INDEX changes_at ON changes (at)",
    ),
)


def ts(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("the store takes timezone-aware datetimes only")
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def opt_dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def dumps_map(mapping: Mapping[str, str]) -> str:
    return json.dumps(dict(mapping), sort_keys=True, separators=(",", ":"))


def loads_map(text: str) -> dict[str, str]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreError("a JSON column holds something that is not an object")
    return {str(k): str(v) for k, v in value.items()}


def dumps_pcrs(pcrs: Mapping[int, bytes]) -> str:
    return json.dumps({str(i): pcrs[i].hex() for i in sorted(pcrs)}, separators=(",", ":"))


def loads_pcrs(text: str) -> dict[int, bytes]:
    return {int(i): bytes.fromhex(v) for i, v in loads_map(text).items()}


def node_from_row(row: sqlite3.Row) -> Node:
    return Node(
        name=row["name"],
        state=NodeState(row["state"]),
        labels=loads_map(row["labels"]),
        ek_hash=row["ek_hash"],
        ek_public=row["ek_public"],
        ek_certificate=row["ek_certificate"],
        ak_public=row["ak_public"],
        metadata=loads_map(row["metadata"]),
        enrolled_at=datetime.fromisoformat(row["enrolled_at"]),
        last_attested_at=opt_dt(row["last_attested_at"]),
        pcr_bank=row["pcr_bank"],
        pcrs=loads_pcrs(row["pcrs"]),
        reset_count=row["reset_count"],
        restart_count=row["restart_count"],
    )


def key_from_row(row: sqlite3.Row, with_secret: bool = True) -> StoredKey:
    return StoredKey(
        name=row["name"],
        version=row["version"],
        algorithm=row["algorithm"],
        encrypted_private=row["encrypted_private"] if with_secret else b"",
        created_at=datetime.fromisoformat(row["created_at"]),
    )


class Database:
    """Connection, migrations and transactions; see ``kbs.store.Store`` for the tables."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: Path) -> Self:
        """Open (creating it 0600 if new) and migrate the database at ``path``."""
        if not path.parent.is_dir():
            raise StoreError(f"database directory {path.parent} does not exist; create it")
        try:
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None
        conn.row_factory = sqlite3.Row
        store = cls(conn, path)
        try:
            store._setup()
        except BaseException:
            conn.close()
            raise
        return store

    def _setup(self) -> None:
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StoreError(f"database {self._path} is unusable: {exc}") from None
        if mode != "wal":
            raise StoreError(f"database {self._path} cannot use WAL mode (got {mode!r})")
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"database {self._path} has schema version {version}, newer than this "
                    f"keylease-kbs understands ({len(MIGRATIONS)}); upgrade keylease-kbs"
                )
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    db.execute(statement)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (len(MIGRATIONS),))

    def schema_version(self) -> int:
        with self._tx(write=False) as db:
            return int(db.execute("SELECT version FROM schema_version").fetchone()[0])

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; KbsErrors raised inside roll it back and propagate."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise StoreError(f"database {self._path}: {exc}") from None
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"database {self._path}: {exc}") from None
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # no transaction left to roll back
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""The broker database's foundation: engine, tables, migrations, transactions, error translation.

SQLAlchemy Core over SQLite (the embedded default, WAL) or PostgreSQL (``postgresql://`` URL,
psycopg 3). Every connection runs in driver autocommit; ``_tx`` issues ``BEGIN`` (SQLite: ``BEGIN
IMMEDIATE`` for writes, serialised in-process by a lock so threads never spin on SQLite's busy
handler) and ``COMMIT`` itself, so a single-statement call (``single=True``) costs one round trip
and a multi-statement change is one transaction that a killed process leaves rolled back.

The schema is created and upgraded by Alembic at open (``kbs/migrations``, run programmatically,
under ``BEGIN IMMEDIATE`` on SQLite and a transaction-scoped advisory lock on PostgreSQL, so
replicas starting together migrate once). Every SQLAlchemy/driver error becomes ``StoreError``
here: ``DatabaseUnavailable`` (gRPC UNAVAILABLE) when the server cannot be reached,
``StoreConflict`` for a unique-constraint race. Timestamps are stored as UTC ISO-8601 text
(fixed width, so they compare as text), PCR maps as JSON ``{"index": "hex"}``, labels and
selectors as canonical JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy import exc as sa_exc

from kbs import migrations
from kbs.errors import StoreError
from kbs.model import Node, NodeState, StoredKey

__all__ = [
    "BUSY_TIMEOUT",
    "HEAD_REVISION",
    "Database",
    "DatabaseUnavailable",
    "StoreConflict",
    "dumps_map",
    "dumps_pcrs",
    "key_from_row",
    "loads_map",
    "loads_pcrs",
    "node_from_row",
    "opt_dt",
    "redact_url",
    "ts",
]

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # our own line per upgrade instead

BUSY_TIMEOUT = 10.0
HEAD_REVISION = "0003"
CONNECT_TIMEOUT = 5  # seconds, PostgreSQL
MIGRATION_LOCK = 0x6B6C6D67  # pg advisory lock id: "klmg"
POOL_SIZE = 8

Row = sa.RowMapping


class DatabaseUnavailable(StoreError):
    """The database server cannot be reached (or SQLite stayed locked); retry later."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class StoreConflict(StoreError):
    """A unique constraint refused a write: another writer got there first."""


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


def node_from_row(row: Row) -> Node:
    return Node(
        name=row["name"],
        state=NodeState(row["state"]),
        labels=loads_map(row["labels"]),
        ek_hash=row["ek_hash"],
        ek_public=bytes(row["ek_public"]),
        ek_certificate=bytes(row["ek_certificate"]),
        ak_public=bytes(row["ak_public"]),
        metadata=loads_map(row["metadata"]),
        enrolled_at=datetime.fromisoformat(row["enrolled_at"]),
        last_attested_at=opt_dt(row["last_attested_at"]),
        pcr_bank=row["pcr_bank"],
        pcrs=loads_pcrs(row["pcrs"]),
        reset_count=row["reset_count"],
        restart_count=row["restart_count"],
    )


def key_from_row(row: Row, with_secret: bool = True) -> StoredKey:
    return StoredKey(
        name=row["name"],
        version=row["version"],
        algorithm=row["algorithm"],
        encrypted_private=bytes(row["encrypted_private"]) if with_secret else b"",
        created_at=datetime.fromisoformat(row["created_at"]),
    )


def redact_url(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


# --- tables (Core) --------------------------------------------------------------------------

META = sa.MetaData()
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER: SQLite's rowid alias


def _table(name: str, *cols: sa.Column[Any]) -> sa.Table:
    return sa.Table(name, META, *cols, sqlite_autoincrement=name in ("audit", "changes"))


def _c(name: str, kind: Any, **kw: Any) -> sa.Column[Any]:
    return sa.Column(name, kind, nullable=kw.pop("nullable", False), **kw)


T, B, I = sa.Text(), sa.LargeBinary(), sa.Integer()  # noqa: E741
nodes = _table(
    "nodes", _c("name", T, primary_key=True), _c("state", T), _c("labels", T),
    _c("ek_hash", T, unique=True), _c("ek_public", B), _c("ek_certificate", B),
    _c("ak_public", B), _c("metadata", T), _c("enrolled_at", T), _c("updated_at", T),
    _c("last_attested_at", T, nullable=True), _c("pcr_bank", T, nullable=True), _c("pcrs", T),
    _c("reset_count", I, nullable=True), _c("restart_count", I, nullable=True),
)  # fmt: skip
nonces = _table("nonces", _c("nonce", B, primary_key=True), _c("node_name", T),
                _c("expires_at", T))  # fmt: skip
enrollments = _table(
    "enrollments", _c("id", T, primary_key=True), _c("node_name", T), _c("ek_public", B),
    _c("ek_certificate", B), _c("ak_public", B), _c("ek_hash", T), _c("secret_sha256", B),
    _c("metadata", T), _c("expires_at", T),
)  # fmt: skip
allowlist = _table("allowlist", _c("ek_hash", T, primary_key=True), _c("added_at", T))
keys = _table(
    "keys", _c("name", T, primary_key=True), _c("version", I, primary_key=True),
    _c("algorithm", T), _c("encrypted_private", B), _c("created_at", T),
)  # fmt: skip
grants = _table("grants", _c("key_name", T, primary_key=True),
                _c("selector", T, primary_key=True), _c("created_at", T))  # fmt: skip
policies = _table("policies", _c("name", T, primary_key=True), _c("pcr_bank", T),
                  _c("pcrs", T), _c("updated_at", T))  # fmt: skip
policy_assignments = _table(
    "policy_assignments", _c("policy_name", T, primary_key=True),
    _c("selector", T, primary_key=True), _c("created_at", T),
)  # fmt: skip
audit_log = _table(
    "audit", _c("id", BIGID, primary_key=True, autoincrement=True), _c("at", T), _c("actor", T),
    _c("event", T), _c("node", T, nullable=True), _c("result", T), _c("detail", T),
)  # fmt: skip
changes = _table(
    "changes", _c("id", BIGID, primary_key=True, autoincrement=True), _c("at", T),
    _c("node", T, nullable=True), _c("kind", T), _c("reason", T),
)  # fmt: skip
admin_revocations = _table("admin_revocations", _c("serial", T, primary_key=True),
                          _c("name", T), _c("revoked_at", T))  # fmt: skip


# --- the database ---------------------------------------------------------------------------


class Database:
    """Engine, migrations and transactions; see ``kbs.store.Store`` for the tables."""

    def __init__(self, engine: sa.Engine, where: str) -> None:
        self._engine = engine
        self._where = where
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        )
        self._compiled: dict[int, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}

    @classmethod
    def open(cls, target: Path | str) -> Self:
        """Open and migrate the database: a SQLite file path (created 0600 if new), or a
        ``postgresql://`` / ``sqlite:///`` URL."""
        if isinstance(target, str) and target.startswith("sqlite:///"):
            target = Path(target.removeprefix("sqlite:///"))
        if isinstance(target, Path):
            engine, where = _sqlite_engine(target), str(target)
        elif target.startswith(("postgresql://", "postgresql+psycopg://")):
            where = redact_url(target)
            url = sa.make_url(target).set(drivername="postgresql+psycopg")
            engine = sa.create_engine(
                url, isolation_level="AUTOCOMMIT", pool_size=POOL_SIZE, max_overflow=POOL_SIZE,
                pool_reset_on_return=None, connect_args={"connect_timeout": CONNECT_TIMEOUT},
            )  # fmt: skip
        else:
            raise StoreError(f"database {target!r}: expected a path or a postgresql:// URL")
        store = cls(engine, where)
        try:
            store._migrate()
        except BaseException:
            engine.dispose()
            raise
        return store

    def _migrate(self) -> None:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", os.path.dirname(migrations.__file__))
        with self._tx() as conn:
            if self.is_sqlite:
                mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
                if mode != "wal":
                    raise StoreError(f"database {self._where} cannot use WAL mode ({mode!r})")
            else:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            current = MigrationContext.configure(conn).get_current_revision()
            if current is not None and current > HEAD_REVISION:
                raise StoreError(
                    f"database {self._where} has schema revision {current}, newer than this "
                    f"keylease-kbs understands ({HEAD_REVISION}); upgrade keylease-kbs"
                )
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            if current != HEAD_REVISION:  # created (or adopted from before Alembic), or upgraded
                level = logging.DEBUG if current is None else logging.INFO
                log.log(level, "database %s: schema %s -> %s", self._where, current, HEAD_REVISION)

    def schema_version(self) -> str:
        """The Alembic revision the database is at."""
        with self._tx(write=False, single=True) as conn:
            return str(MigrationContext.configure(conn).get_current_revision())

    def ping(self) -> None:
        """One cheap round trip; DatabaseUnavailable / StoreError if the database does not
        answer."""
        with self._tx(write=False, single=True) as conn:
            conn.execute(sa.text("SELECT 1")).scalar()

    def _run(
        self, db: sa.Connection, stmt: sa.ClauseElement, params: Mapping[str, Any]
    ) -> sa.CursorResult[Any]:
        """Execute a module-level Core statement (with ``bindparam``s) compiled once for this
        dialect: the hot paths skip SQLAlchemy's per-call statement building and cache lookup."""
        compiled = self._compiled.get(id(stmt))
        if compiled is None:
            done = stmt.compile(dialect=self._engine.dialect)
            positions = getattr(done, "positiontup", None)  # qmark dialects (SQLite)
            order = tuple(positions) if positions is not None else None
            compiled = (str(done), order, dict(done.params))
            self._compiled[id(stmt)] = compiled
        sql, order, defaults = compiled
        values = {**defaults, **params}
        if order is None:
            return db.exec_driver_sql(sql, values)
        return db.exec_driver_sql(sql, tuple(values[k] for k in order))

    @contextmanager
    def _tx(
        self, write: bool = True, single: bool = False, catalog: bool = True
    ) -> Iterator[sa.Connection]:
        """One transaction (``single``: one statement, run in autocommit); KbsErrors raised
        inside roll it back and propagate; database errors become StoreError. A write that may
        change what ``_catalog_changed`` caches (``catalog``, the default) drops those caches
        once committed; only the attestation path's writes pass ``catalog=False``."""
        with self._write_lock if write else contextlib.nullcontext(), self._translate():
            conn = self._engine.connect()
            try:
                if single:
                    yield conn
                else:
                    conn.exec_driver_sql("BEGIN IMMEDIATE" if write and self.is_sqlite else "BEGIN")
                    try:
                        yield conn
                        conn.exec_driver_sql("COMMIT")
                    except BaseException:
                        self._rollback(conn)
                        raise
            finally:
                conn.close()
                if write and catalog:
                    self._catalog_changed()

    def _catalog_changed(self) -> None:
        """Hook: this process wrote something that in-process caches may hold (a subclass
        drops them)."""

    @staticmethod
    def _rollback(conn: sa.Connection) -> None:
        try:
            conn.exec_driver_sql("ROLLBACK")
        except sa_exc.SQLAlchemyError:  # the connection is gone: the server rolls back itself
            with contextlib.suppress(sa_exc.SQLAlchemyError):
                conn.invalidate()

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except sa_exc.IntegrityError as exc:
            raise StoreConflict(f"database {self._where}: {_first_line(exc)}") from None
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError):
                raise DatabaseUnavailable(
                    f"database {self._where} is unavailable ({_first_line(exc)}); the broker "
                    "retries by itself: check that the database server is running and reachable"
                ) from None
            raise StoreError(f"database {self._where}: {_first_line(exc)}") from None
        except sa_exc.SQLAlchemyError as exc:
            raise StoreError(f"database {self._where}: {_first_line(exc)}") from None

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _first_line(exc: sa_exc.SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sqlite_engine(path: Path) -> sa.Engine:
    if not path.parent.is_dir():
        raise StoreError(f"database directory {path.parent} does not exist; create it")
    try:
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as exc:
        raise StoreError(f"cannot create database {path}: {exc.strerror}") from None
    engine = sa.create_engine(
        sa.URL.create("sqlite", database=str(path)),
        isolation_level="AUTOCOMMIT",
        pool_size=POOL_SIZE,
        max_overflow=0,
        pool_timeout=BUSY_TIMEOUT,
        pool_reset_on_return=None,
        connect_args={"timeout": BUSY_TIMEOUT, "check_same_thread": False},
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL with WAL: a commit no longer waits for an fsync of the WAL (checkpoints
            # still do), so a power loss (not a crash of the process) can roll back the last
            # commits; the file stays consistent. What can come back is harmless: a consumed
            # nonce cannot release anything again (a release is sealed to the node's TPM and a
            # nonce expires in 60 s), and lost audit rows are the attestations of those seconds.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    return engine

"""The broker database's engine and transactions, and the one place its errors are translated.

SQLAlchemy Core over SQLite (the embedded default, WAL) or PostgreSQL (``postgresql://`` URL,
psycopg 3). Every connection runs in driver autocommit; ``tx`` issues ``BEGIN`` (SQLite: ``BEGIN
IMMEDIATE`` for writes, serialised in-process by a lock so threads never spin on SQLite's busy
handler) and ``COMMIT`` itself, so a single-statement call (``single=True``) costs one round trip
and a multi-statement change is one transaction that a killed process leaves rolled back.

Every SQLAlchemy/driver error becomes ``StoreError`` here: ``DatabaseUnavailable`` when the
server cannot be reached, ``StoreConflict`` for a unique-constraint race.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from kbs.errors import DatabaseUnavailable, StoreConflict, StoreError

__all__ = ["BUSY_TIMEOUT", "Database", "redact_url"]

BUSY_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5  # seconds, PostgreSQL
POOL_SIZE = 8


def redact_url(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


class Database:
    """An engine plus transactions; ``where`` names it in messages (never with a password)."""

    def __init__(self, engine: sa.Engine, where: str) -> None:
        self.engine = engine
        self.where = where
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        )
        self._compiled: dict[int, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}
        self._catalog_listeners: list[Callable[[], None]] = []

    @classmethod
    def connect(cls, target: Path | str) -> Database:
        """A SQLite file path (created 0600 if new), or a ``postgresql://`` / ``sqlite:///``
        URL; nothing is read or migrated yet."""
        if isinstance(target, str) and target.startswith("sqlite:///"):
            target = Path(target.removeprefix("sqlite:///"))
        if isinstance(target, Path):
            return cls(_sqlite_engine(target), str(target))
        if target.startswith(("postgresql://", "postgresql+psycopg://")):
            url = sa.make_url(target).set(drivername="postgresql+psycopg")
            engine = sa.create_engine(
                url, isolation_level="AUTOCOMMIT", pool_size=POOL_SIZE, max_overflow=POOL_SIZE,
                pool_reset_on_return=None, connect_args={"connect_timeout": CONNECT_TIMEOUT},
            )  # fmt: skip
            return cls(engine, redact_url(target))
        raise StoreError(f"database {target!r}: expected a path or a postgresql:// URL")

    def on_catalog_write(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every write transaction that may change what in-process
        caches hold (every write but the attestation path's, which pass ``catalog=False``)."""
        self._catalog_listeners.append(listener)

    def upsert(self, table: sa.Table) -> Any:
        """``INSERT ... ON CONFLICT`` for this dialect (``on_conflict_do_nothing``/``_update``)."""
        return (sqlite.insert if self.is_sqlite else postgresql.insert)(table)

    def run(
        self, conn: sa.Connection, stmt: sa.ClauseElement, params: Mapping[str, Any]
    ) -> sa.CursorResult[Any]:
        """Execute a module-level Core statement (with ``bindparam``s) compiled once for this
        dialect: the hot paths skip SQLAlchemy's per-call statement building and cache lookup."""
        compiled = self._compiled.get(id(stmt))
        if compiled is None:
            done = stmt.compile(dialect=self.engine.dialect)
            positions = getattr(done, "positiontup", None)  # qmark dialects (SQLite)
            order = tuple(positions) if positions is not None else None
            compiled = (str(done), order, dict(done.params))
            self._compiled[id(stmt)] = compiled
        sql, order, defaults = compiled
        values = {**defaults, **params}
        if order is None:
            return conn.exec_driver_sql(sql, values)
        return conn.exec_driver_sql(sql, tuple(values[k] for k in order))

    @contextmanager
    def tx(
        self, write: bool = True, single: bool = False, catalog: bool = True
    ) -> Iterator[sa.Connection]:
        """One transaction (``single``: one statement, run in autocommit); KbsErrors raised
        inside roll it back and propagate; database errors become StoreError. A write that may
        change what caches hold (``catalog``, the default) tells the ``on_catalog_write``
        listeners once it is over; only the attestation path's writes pass ``catalog=False``."""
        with self._write_lock if write else contextlib.nullcontext(), self._translate():
            conn = self.engine.connect()
            try:
                if single:
                    yield conn
                else:
                    conn.exec_driver_sql("BEGIN IMMEDIATE" if write and self.is_sqlite else "BEGIN")
                    try:
                        yield conn
                        conn.exec_driver_sql("COMMIT")
                    except BaseException:
                        _rollback(conn)
                        raise
            finally:
                conn.close()
                if write and catalog:
                    for listener in self._catalog_listeners:
                        listener()

    def ping(self) -> None:
        """One cheap round trip; DatabaseUnavailable / StoreError if the database does not
        answer."""
        with self.tx(write=False, single=True) as conn:
            conn.execute(sa.text("SELECT 1")).scalar()

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except sa_exc.IntegrityError as exc:
            raise StoreConflict(f"database {self.where}: {_first_line(exc)}") from None
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError):
                raise DatabaseUnavailable(
                    f"database {self.where} is unavailable ({_first_line(exc)}); the broker "
                    "retries by itself: check that the database server is running and reachable"
                ) from None
            raise StoreError(f"database {self.where}: {_first_line(exc)}") from None
        except sa_exc.SQLAlchemyError as exc:
            raise StoreError(f"database {self.where}: {_first_line(exc)}") from None

    def close(self) -> None:
        self.engine.dispose()


def _rollback(conn: sa.Connection) -> None:
    try:
        conn.exec_driver_sql("ROLLBACK")
    except sa_exc.SQLAlchemyError:  # the connection is gone: the server rolls back itself
        with contextlib.suppress(sa_exc.SQLAlchemyError):
            conn.invalidate()


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

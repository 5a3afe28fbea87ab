"""The broker database's schema: created and upgraded by Alembic when a store is opened.

The revisions live in ``kbs/store/migrations`` and run programmatically, under ``BEGIN
IMMEDIATE`` on SQLite and a transaction-scoped advisory lock on PostgreSQL, so replicas starting
together migrate once. A database written by a newer keylease-kbs (a revision this one does not
know) is refused rather than touched. Alembic's own INFO lines are quietened by the
command line (``kbs.cli``), which configures logging; one line per upgrade is logged here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from kbs.errors import StoreError
from kbs.store.database import Database

__all__ = ["HEAD_REVISION", "MIGRATIONS", "migrate", "schema_version"]

log = logging.getLogger(__name__)

HEAD_REVISION = "0008_approved_states"
MIGRATION_LOCK = 0x6B6C6D67  # pg advisory lock id: "klmg"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def migrate(db: Database) -> None:
    """Bring ``db`` to ``HEAD_REVISION`` (creating the schema in an empty database, adopting one
    written before Alembic); StoreError for a newer revision or a SQLite file without WAL."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.tx() as conn:
        if db.is_sqlite:
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            if mode != "wal":
                raise StoreError(f"database {db.where} cannot use WAL mode ({mode!r})")
        else:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
        current = MigrationContext.configure(conn).get_current_revision()
        known = {rev.revision for rev in ScriptDirectory.from_config(cfg).walk_revisions()}
        if current is not None and current not in known:
            raise StoreError(
                f"database {db.where} has schema revision {current}, newer than this "
                f"keylease-kbs understands ({HEAD_REVISION}); upgrade keylease-kbs"
            )
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        if current != HEAD_REVISION:  # created (or adopted from before Alembic), or upgraded
            level = logging.DEBUG if current is None else logging.INFO
            log.log(level, "database %s: schema %s -> %s", db.where, current, HEAD_REVISION)


def schema_version(db: Database) -> str:
    """The Alembic revision the database is at."""
    with db.tx(write=False, single=True) as conn:
        return str(MigrationContext.configure(conn).get_current_revision())

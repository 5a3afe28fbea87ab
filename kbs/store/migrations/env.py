"""Alembic environment: migrate the connection ``kbs.store.migrate`` passes in, inside its
transaction.

``transactional_ddl`` is off because the caller already issued ``BEGIN`` (``BEGIN IMMEDIATE`` on
SQLite, plus an advisory lock on PostgreSQL) and commits after the last revision.
"""

from __future__ import annotations

from alembic import context

__all__: list[str] = []

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "kbs.store.migrations runs only from kbs.store.migrate (no connection was passed)"
    )
context.configure(connection=connection, transactional_ddl=False)
context.run_migrations()

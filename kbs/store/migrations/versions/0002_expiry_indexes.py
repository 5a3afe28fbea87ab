"""Indexes on ``expires_at`` for the periodic purge of expired nonces and enrollment challenges.

A database created by ``0001`` already has ``nonces_expiry``; one adopted from before Alembic
does not, and no database has ``enrollments_expiry``: each is created only where it is missing,
so this revision upgrades every database ``0001`` can leave behind.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kbs.errors import StoreError

__all__ = ["branch_labels", "depends_on", "down_revision", "downgrade", "revision", "upgrade"]

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

INDEXES = (("nonces_expiry", "nonces"), ("enrollments_expiry", "enrollments"))


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name, table in INDEXES:
        if name not in {ix["name"] for ix in inspector.get_indexes(table)}:
            op.create_index(name, table, ["expires_at"])


def downgrade() -> None:
    raise StoreError("the broker database cannot be downgraded")

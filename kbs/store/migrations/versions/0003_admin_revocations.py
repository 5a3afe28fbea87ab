"""Revoked admin certificates in the database, so that every replica sharing it refuses them.

``admin_revocations`` holds one row per revoked certificate: its serial (lower-case hex, as in
``admin_certs``) as the primary key, the operator name it was issued to, and when it was revoked
(ISO-8601 UTC text). A database at ``0002`` gains the empty table; no other table changes.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kbs.errors import StoreError

__all__ = ["branch_labels", "depends_on", "down_revision", "downgrade", "revision", "upgrade"]

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

TEXT = sa.Text()


def upgrade() -> None:
    op.create_table(
        "admin_revocations",
        sa.Column("serial", TEXT, primary_key=True),
        sa.Column("name", TEXT, nullable=False),
        sa.Column("revoked_at", TEXT, nullable=False),
    )


def downgrade() -> None:
    raise StoreError("the broker database cannot be downgraded")

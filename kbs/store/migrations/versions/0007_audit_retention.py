"""An index on ``audit.at``, for the periodic deletion of audit rows older than
``audit_retention_days`` (``kbs.store.audit.prune_audit``), created where it is missing. No
table changes.

Revision ID: 0007_audit_retention
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kbs.errors import StoreError

__all__ = ["branch_labels", "depends_on", "down_revision", "downgrade", "revision", "upgrade"]

revision = "0007_audit_retention"
down_revision: str | None = "0006_node_keys"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    if "audit_at" not in {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("audit")}:
        op.create_index("audit_at", "audit", ["at"])


def downgrade() -> None:
    raise StoreError("the broker database cannot be downgraded")

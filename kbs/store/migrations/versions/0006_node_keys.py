"""Per-node keys: ``nodes.node_key`` holds the key each node proves its calls with.

The key is derived from the enrollment challenge's secret (``keylease.api.v1.nodeauth``) and
stored sealed under the master key (AES-256-GCM, the node name as associated data), replaced on
every enrollment. A database at ``0003`` gains the column empty: its nodes' calls are refused
(UNAUTHENTICATED) until their agents enroll again, which they do by themselves.

Revision ID: 0006_node_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kbs.errors import StoreError

__all__ = ["branch_labels", "depends_on", "down_revision", "downgrade", "revision", "upgrade"]

revision = "0006_node_keys"
down_revision: str | None = "0005_key_versions"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("node_key", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    raise StoreError("the broker database cannot be downgraded")

"""Approved boot states (issue 11): what the broker signs approvals for, per node.

- ``approved_states``: per node, the boot states it may reopen its sealed releases in (JSON: the
  state it was last released for, and the states a widened policy approved for it: seen on a
  canary or predicted from its log). Signed anew with every release, while its policies allow
  them.
- ``nodes.approval_limit``, ``release_group``, ``release_signer``: of the node's last release,
  the TPM-clock limit its approvals carry, the policy group and the signing key (SHA-256 of the
  certificate) its sealed object is bound to; approvals pushed for a widened policy use them.
- ``changes.payload``: the approvals a change row carries to the node's watch stream.

A database at ``0007`` gains them empty: each node's next release (after the upgrade, its first
one bound to approvals) fills them.

Revision ID: 0008_approved_states
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kbs.errors import StoreError

__all__ = ["branch_labels", "depends_on", "down_revision", "downgrade", "revision", "upgrade"]

revision = "0008_approved_states"
down_revision: str | None = "0007_audit_retention"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "approved_states",
        sa.Column("node_name", sa.Text(), primary_key=True),
        sa.Column("states", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Text(), nullable=False),
    )
    op.add_column("nodes", sa.Column("approval_limit", sa.BigInteger(), nullable=True))
    op.add_column("nodes", sa.Column("release_group", sa.Text(), nullable=True))
    op.add_column("nodes", sa.Column("release_signer", sa.Text(), nullable=True))
    op.add_column("changes", sa.Column("payload", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    raise StoreError("the broker database cannot be downgraded")

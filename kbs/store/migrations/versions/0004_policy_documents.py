"""Policies become documents of allowed values per boot component; nodes keep every quoted bank,
their last verified boot state and their last denial.

- ``policies.document`` (JSON: bank and rules, ``kbs.policy.rules``) replaces ``policies.pcrs``:
  an old policy of PCR reference values becomes raw ``pcr.N`` rules, one allowed value each.
- ``nodes.pcr_banks`` (JSON ``{"sha256": {"0": "hex", ...}}``) replaces ``pcr_bank`` + ``pcrs``;
  ``nodes.boot_log_digest``, ``last_denial`` and ``last_denial_at`` are new (NULL).
- ``boot_states`` (new): per node, the boot state of its last verified event log in each bank.

Revision ID: 0004_policy_documents
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

from kbs.errors import StoreError

__all__ = ["branch_labels", "depends_on", "down_revision", "downgrade", "revision", "upgrade"]

revision = "0004_policy_documents"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

TEXT = sa.Text()
MIGRATED_NOTE = "from the PCR policy before components (migration 0004)"


def _nodes(bind: sa.Connection) -> None:
    op.add_column("nodes", sa.Column("pcr_banks", TEXT, nullable=False, server_default="{}"))
    for column in ("boot_log_digest", "last_denial", "last_denial_at"):
        op.add_column("nodes", sa.Column(column, TEXT, nullable=True))
    rows = bind.execute(sa.text("SELECT name, pcr_bank, pcrs FROM nodes")).all()
    for name, bank, pcrs in rows:
        if bank:
            banks = json.dumps({bank: json.loads(pcrs or "{}")}, separators=(",", ":"))
            bind.execute(
                sa.text("UPDATE nodes SET pcr_banks = :b WHERE name = :n"), {"b": banks, "n": name}
            )
    op.drop_column("nodes", "pcr_bank")
    op.drop_column("nodes", "pcrs")


def _policies(bind: sa.Connection) -> None:
    op.add_column("policies", sa.Column("document", TEXT, nullable=False, server_default="{}"))
    for name, bank, pcrs in bind.execute(sa.text("SELECT name, pcr_bank, pcrs FROM policies")):
        values = json.loads(pcrs or "{}")
        rules = [
            {"component": f"pcr.{i}", "allow": [{"value": values[i], "note": MIGRATED_NOTE}]}
            for i in sorted(values, key=int)
        ]
        document = json.dumps({"bank": bank, "rules": rules}, separators=(",", ":"))
        bind.execute(
            sa.text("UPDATE policies SET document = :d WHERE name = :n"),
            {"d": document, "n": name},
        )
    op.drop_column("policies", "pcrs")


def upgrade() -> None:
    bind = op.get_bind()
    _nodes(bind)
    _policies(bind)
    op.create_table(
        "boot_states",
        sa.Column(
            "node_name", TEXT, sa.ForeignKey("nodes.name", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("log_digest", TEXT, nullable=False),
        sa.Column("states", TEXT, nullable=False),
        sa.Column("recorded_at", TEXT, nullable=False),
    )


def downgrade() -> None:
    raise StoreError("the broker database cannot be downgraded")

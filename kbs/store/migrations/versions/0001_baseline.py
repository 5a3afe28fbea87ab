"""Baseline: create the broker schema, or adopt a database written before Alembic.

A database from before (SQLite with a ``schema_version`` table, version 1 or 2) is upgraded in
place: version 1 gains the ``changes`` table, then ``schema_version`` is dropped; rows are kept.
A fresh database (SQLite or PostgreSQL) gets every table. Timestamps are ISO-8601 UTC text on
both; ids are INTEGER (SQLite rowid, AUTOINCREMENT) or BIGINT identities (PostgreSQL).

Revision ID: 0001
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from kbs.errors import StoreError

__all__ = ["branch_labels", "depends_on", "down_revision", "downgrade", "revision", "upgrade"]

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

LEGACY_VERSION = 2
TEXT, BLOB, INT = sa.Text(), sa.LargeBinary(), sa.Integer()
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
STATES = "state IN ('pending', 'approved', 'revoked')"


def _col(name: str, kind: sa.types.TypeEngine[Any], *, null: bool = False) -> sa.Column[Any]:
    empty = name in ("labels", "metadata", "pcrs")  # JSON objects, '{}' when not given
    return sa.Column(name, kind, nullable=null, server_default="{}" if empty else None)


def _changes() -> None:
    op.create_table(
        "changes",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        _col("at", TEXT), _col("node", TEXT, null=True), _col("kind", TEXT), _col("reason", TEXT),
        sa.CheckConstraint("kind IN ('revoked', 'changed')", name="changes_kind"),
        sqlite_autoincrement=True,
    )  # fmt: skip
    op.create_index("changes_at", "changes", ["at"])


def _adopt_legacy(bind: sa.Connection) -> None:
    version = int(bind.execute(sa.text("SELECT version FROM schema_version")).scalar() or 0)
    if version > LEGACY_VERSION or version < 1:
        raise StoreError(
            f"the database has schema version {version}, newer than this keylease-kbs "
            "understands; upgrade keylease-kbs"
            if version > LEGACY_VERSION
            else f"the database has an unusable schema version {version}"
        )
    if version < 2:
        _changes()
    op.drop_table("schema_version")


def upgrade() -> None:
    bind = op.get_bind()
    if "schema_version" in sa.inspect(bind).get_table_names():
        _adopt_legacy(bind)
        return
    op.create_table(
        "nodes",
        sa.Column("name", TEXT, primary_key=True),
        _col("state", TEXT), _col("labels", TEXT), _col("ek_hash", TEXT), _col("ek_public", BLOB),
        _col("ek_certificate", BLOB), _col("ak_public", BLOB), _col("metadata", TEXT),
        _col("enrolled_at", TEXT), _col("updated_at", TEXT),
        _col("last_attested_at", TEXT, null=True), _col("pcr_bank", TEXT, null=True),
        _col("pcrs", TEXT), _col("reset_count", INT, null=True),
        _col("restart_count", INT, null=True),
        sa.CheckConstraint(STATES, name="nodes_state"),
        sa.UniqueConstraint("ek_hash", name="nodes_ek_hash"),
    )  # fmt: skip
    op.create_table(
        "nonces",
        sa.Column("nonce", BLOB, primary_key=True),
        sa.Column("node_name", TEXT, sa.ForeignKey("nodes.name", ondelete="CASCADE"),
                  nullable=False),
        _col("expires_at", TEXT),
    )  # fmt: skip
    op.create_index("nonces_node", "nonces", ["node_name", "expires_at"])
    op.create_index("nonces_expiry", "nonces", ["expires_at"])
    op.create_table(
        "enrollments",
        sa.Column("id", TEXT, primary_key=True),
        _col("node_name", TEXT), _col("ek_public", BLOB), _col("ek_certificate", BLOB),
        _col("ak_public", BLOB), _col("ek_hash", TEXT), _col("secret_sha256", BLOB),
        _col("metadata", TEXT), _col("expires_at", TEXT),
    )  # fmt: skip
    op.create_index("enrollments_node", "enrollments", ["node_name", "expires_at"])
    op.create_table(
        "allowlist", sa.Column("ek_hash", TEXT, primary_key=True), _col("added_at", TEXT)
    )
    op.create_table(
        "keys",
        sa.Column("name", TEXT, primary_key=True),
        sa.Column("version", INT, sa.CheckConstraint("version >= 1"), primary_key=True),
        _col("algorithm", TEXT), _col("encrypted_private", BLOB), _col("created_at", TEXT),
    )  # fmt: skip
    op.create_table(
        "grants",
        sa.Column("key_name", TEXT, primary_key=True),
        sa.Column("selector", TEXT, primary_key=True),
        _col("created_at", TEXT),
    )
    op.create_table(
        "policies",
        sa.Column("name", TEXT, primary_key=True),
        _col("pcr_bank", TEXT), _col("pcrs", TEXT), _col("updated_at", TEXT),
    )  # fmt: skip
    op.create_table(
        "policy_assignments",
        sa.Column("policy_name", TEXT, sa.ForeignKey("policies.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("selector", TEXT, primary_key=True),
        _col("created_at", TEXT),
    )  # fmt: skip
    op.create_table(
        "audit",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        _col("at", TEXT), _col("actor", TEXT), _col("event", TEXT), _col("node", TEXT, null=True),
        _col("result", TEXT), _col("detail", TEXT),
        sqlite_autoincrement=True,
    )  # fmt: skip
    op.create_index("audit_node", "audit", ["node", "id"])
    _changes()


def downgrade() -> None:
    raise StoreError("the broker database cannot be downgraded below its baseline")

"""Key versions that live as long as the images encrypted to them, and who holds which.

``keys.retired_at`` (ISO-8601 UTC text, NULL while the version is released): every version not
retired is released, not only the newest. Before this revision only the newest version of a key
was released, so an existing database keeps exactly that: every older version is marked retired
at the time of the upgrade, and no node receives a key it was not receiving before.

``nodes.held_keys`` (JSON ``[["name", version], ...]``, ``[]`` by default) and
``nodes.lease_until``: what the node's latest release gave it and until when (``key show``).
Existing nodes start with none recorded; their next attestation fills them in.

Revision ID: 0005_key_versions
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from kbs.errors import StoreError

__all__ = ["branch_labels", "depends_on", "down_revision", "downgrade", "revision", "upgrade"]

revision = "0005_key_versions"
down_revision: str | None = "0004_policy_documents"
branch_labels: str | None = None
depends_on: str | None = None

TEXT = sa.Text()


def upgrade() -> None:
    op.add_column("keys", sa.Column("retired_at", TEXT, nullable=True))
    op.add_column("nodes", sa.Column("held_keys", TEXT, nullable=False, server_default="[]"))
    op.add_column("nodes", sa.Column("lease_until", TEXT, nullable=True))
    keys = sa.table(
        "keys", sa.column("name", TEXT), sa.column("version", sa.Integer()),
        sa.column("retired_at", TEXT),
    )  # fmt: skip
    newer = sa.alias(keys, "newer")
    has_newer = (
        sa.select(newer.c.version)
        .where(newer.c.name == keys.c.name, newer.c.version > keys.c.version)
        .exists()
    )
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    op.execute(keys.update().where(has_newer).values(retired_at=now))


def downgrade() -> None:
    raise StoreError("the broker database cannot be downgraded")

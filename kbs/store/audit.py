"""The audit log: one row per protocol outcome and operator action, never changed afterwards.

Rows written as part of another operation (an attestation's outcome, an admin revocation) go
through ``write_audit`` inside that operation's transaction, so the action and its record commit
together. ``list_audit`` returns entries oldest first. ``prune_audit`` deletes rows older than a
cut-off (``audit_retention_days``), a batch per transaction so that attestations writing their
rows meanwhile never wait long (the ``audit_at`` index keeps each batch cheap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from kbs.model import AuditEntry
from kbs.store.database import Database
from kbs.store.tables import audit_log, ts

__all__ = ["PRUNE_BATCH", "AuditEvent", "add_audit", "list_audit", "prune_audit", "write_audit"]

PRUNE_BATCH = 5000
P = sa.bindparam
# On the attestation path: compiled once per dialect (``Database.run``).
AUDIT = audit_log.insert().values(
    at=P("p_at"), actor=P("p_actor"), event=P("p_event"), node=P("p_node"),
    result=P("p_result"), detail=P("p_detail"),
)  # fmt: skip


@dataclass(frozen=True)
class AuditEvent:
    """One audit row to write (its time is the transaction's ``now``)."""

    actor: str
    event: str
    node: str | None
    result: str
    detail: str


def write_audit(
    db: Database, conn: sa.Connection, events: Sequence[AuditEvent], now: datetime
) -> None:
    """Write ``events`` in the open transaction ``conn``."""
    at = ts(now)
    for e in events:
        params = {"p_at": at, "p_actor": e.actor, "p_event": e.event, "p_node": e.node,
                  "p_result": e.result, "p_detail": e.detail}  # fmt: skip
        db.run(conn, AUDIT, params)


def add_audit(db: Database, event: AuditEvent, now: datetime) -> None:
    """Write one row on its own."""
    with db.tx(single=True, catalog=False) as conn:
        write_audit(db, conn, [event], now)


def list_audit(db: Database, node: str | None = None, limit: int = 100) -> list[AuditEntry]:
    """The ``limit`` most recent entries (for ``node`` if given), oldest first."""
    query = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(max(limit, 0))
    if node is not None:
        query = query.where(audit_log.c.node == node)
    with db.tx(write=False, single=True) as conn:
        rows = conn.execute(query).mappings().all()
    return [
        AuditEntry(
            id=int(r["id"]),
            at=datetime.fromisoformat(r["at"]),
            actor=r["actor"],
            event=r["event"],
            node=r["node"],
            result=r["result"],
            detail=r["detail"],
        )
        for r in reversed(rows)
    ]


def prune_audit(db: Database, before: datetime, batch: int = PRUNE_BATCH) -> int:
    """Delete the rows written before ``before``, ``batch`` per transaction; returns how many."""
    cutoff = ts(before)
    deleted = 0
    while True:
        oldest = (
            sa.select(audit_log.c.id).where(audit_log.c.at < cutoff).order_by(audit_log.c.at)
        ).limit(batch)
        with db.tx(single=True, catalog=False) as conn:
            done = conn.execute(
                audit_log.delete().where(audit_log.c.id.in_(oldest.scalar_subquery()))
            ).rowcount
        deleted += done
        if done < batch:
            return deleted

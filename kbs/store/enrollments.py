"""What enrollment needs from the database: credential-activation challenges and the EK allowlist.

A challenge (``PendingEnrollment``) is taken once, by one ``DELETE ... RETURNING``, whatever
replica the proof arrives at; only the newest ``MAX_ENROLLMENTS_PER_NODE`` per node name and EK
are kept (so a stranger claiming the name with another EK evicts nothing of the real node's, and
one replaying its public EK data is held to the per-EK rate limit, ``kbs.nodeapi.admission``,
far below this bound for the milliseconds the real agent needs), and expired ones are purged
now and then (``kbs.store.expiry``). The allowlist holds the
EK hashes an operator registered for ``enrollment = "allowlist"``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

from kbs.errors import ActivationFailed
from kbs.model import PendingEnrollment
from kbs.store.database import Database
from kbs.store.expiry import PURGE_GRACE, PurgeTimer
from kbs.store.tables import allowlist, dumps_map, enrollments, loads_map, ts

__all__ = [
    "MAX_ENROLLMENTS_PER_NODE",
    "add_enrollment",
    "allow_ek",
    "is_ek_allowed",
    "list_allowlist",
    "take_enrollment",
]

MAX_ENROLLMENTS_PER_NODE = 16


def add_enrollment(db: Database, purge: PurgeTimer, pending: PendingEnrollment) -> None:
    """Record a credential-activation challenge."""
    newest = (
        sa.select(enrollments.c.id)
        .where(
            enrollments.c.node_name == pending.node_name,
            enrollments.c.ek_hash == pending.ek_hash,
        )
        .order_by(enrollments.c.expires_at.desc())
        .limit(MAX_ENROLLMENTS_PER_NODE)
    )
    with db.tx(catalog=False) as conn:
        conn.execute(
            enrollments.insert().values(
                id=pending.id, node_name=pending.node_name, ek_public=pending.ek_public,
                ek_certificate=pending.ek_certificate, ak_public=pending.ak_public,
                ek_hash=pending.ek_hash, secret_sha256=pending.secret_sha256,
                metadata=dumps_map(pending.metadata), expires_at=ts(pending.expires_at),
            )
        )  # fmt: skip
        conn.execute(
            enrollments.delete().where(
                enrollments.c.node_name == pending.node_name,
                enrollments.c.ek_hash == pending.ek_hash,
                enrollments.c.id.not_in(newest),
            )
        )
        if purge.due():
            cutoff = ts(pending.expires_at - PURGE_GRACE - timedelta(hours=1))
            conn.execute(enrollments.delete().where(enrollments.c.expires_at < cutoff))


def take_enrollment(db: Database, enrollment_id: str, now: datetime) -> PendingEnrollment:
    """Remove and return a challenge (single use); ActivationFailed if unknown or expired."""
    stmt = enrollments.delete().where(enrollments.c.id == enrollment_id).returning(enrollments)
    with db.tx(single=True, catalog=False) as conn:
        row = conn.execute(stmt).mappings().first()
    if row is None:
        raise ActivationFailed(
            "unknown or already used enrollment id; the agent must start enrollment again"
        )
    pending = PendingEnrollment(
        id=row["id"],
        node_name=row["node_name"],
        ek_public=bytes(row["ek_public"]),
        ek_certificate=bytes(row["ek_certificate"]),
        ak_public=bytes(row["ak_public"]),
        ek_hash=row["ek_hash"],
        secret_sha256=bytes(row["secret_sha256"]),
        metadata=loads_map(row["metadata"]),
        expires_at=datetime.fromisoformat(row["expires_at"]),
    )
    if now >= pending.expires_at:
        raise ActivationFailed(
            f"enrollment challenge expired at {pending.expires_at.isoformat()}; the agent "
            "must start enrollment again"
        )
    return pending


def is_ek_allowed(db: Database, ek_hash: str) -> bool:
    with db.tx(write=False, single=True) as conn:
        row = conn.execute(sa.select(sa.literal(1)).where(allowlist.c.ek_hash == ek_hash)).first()
    return row is not None


def allow_ek(db: Database, ek_hash: str, now: datetime) -> bool:
    """Register an EK hash; False if it was already registered."""
    stmt = db.upsert(allowlist).values(ek_hash=ek_hash, added_at=ts(now))
    with db.tx(single=True) as conn:
        return (
            conn.execute(stmt.on_conflict_do_nothing().returning(sa.literal(1))).first() is not None
        )


def list_allowlist(db: Database) -> list[tuple[str, datetime]]:
    query = sa.select(allowlist).order_by(allowlist.c.added_at, allowlist.c.ek_hash)
    with db.tx(write=False, single=True) as conn:
        rows = conn.execute(query).all()
    return [(ek, datetime.fromisoformat(at)) for ek, at in rows]

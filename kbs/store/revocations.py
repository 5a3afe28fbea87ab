"""Revoked admin certificates (``kbs.admin.certs``), by serial, shared by every replica on the
database.

Adding is idempotent (a serial already recorded keeps its first row) and commits with its audit
row. ``admin_revocation`` is one round trip and never cached: every admin RPC asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from kbs.store.audit import AuditEvent, write_audit
from kbs.store.database import Database
from kbs.store.tables import admin_revocations, ts

__all__ = [
    "AdminRevocation",
    "add_admin_revocations",
    "admin_revocation",
    "list_admin_revocations",
]

P = sa.bindparam
GET_REVOCATION = sa.select(admin_revocations).where(admin_revocations.c.serial == P("p_serial"))


@dataclass(frozen=True)
class AdminRevocation:
    """A revoked admin certificate: its serial (lower-case hex), operator name, when."""

    serial: str
    name: str
    revoked_at: datetime


def add_admin_revocations(
    db: Database, revocations: Sequence[AdminRevocation], audit: AuditEvent, now: datetime
) -> list[str]:
    """Record ``revocations`` and the ``audit`` row in one transaction; the serials that were
    not recorded before (one already there keeps its first row: calling again is harmless)."""
    added: list[str] = []
    with db.tx(catalog=False) as conn:
        for r in revocations:
            stmt = db.upsert(admin_revocations).values(
                serial=r.serial, name=r.name, revoked_at=ts(r.revoked_at)
            )
            if conn.execute(stmt.on_conflict_do_nothing().returning(sa.literal(1))).first():
                added.append(r.serial)
        write_audit(db, conn, [audit], now)
    return added


def _revocation(row: sa.RowMapping) -> AdminRevocation:
    return AdminRevocation(
        str(row["serial"]), str(row["name"]), datetime.fromisoformat(row["revoked_at"])
    )


def admin_revocation(db: Database, serial: str) -> AdminRevocation | None:
    """The revocation of the admin certificate with ``serial``, or None if it is not revoked."""
    with db.tx(write=False, single=True) as conn:
        row = db.run(conn, GET_REVOCATION, {"p_serial": serial}).mappings().first()
    return None if row is None else _revocation(row)


def list_admin_revocations(db: Database) -> list[AdminRevocation]:
    """Every revoked admin certificate, by name then serial."""
    query = sa.select(admin_revocations).order_by(
        admin_revocations.c.name, admin_revocations.c.serial
    )
    with db.tx(write=False, single=True) as conn:
        rows = conn.execute(query).mappings().all()
    return [_revocation(r) for r in rows]

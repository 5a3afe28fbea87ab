"""Store operations behind ``key delete`` and ``master-key rotate``.

Functions over ``kbs.store.Store`` (they use its transaction and change-feed helpers, like the
mixins in ``kbs.store_catalog``), kept here so that they need no change to the ``Store`` class:

- ``delete_key``: every version and every grant of a key go in one transaction, which also
  records a CHANGED row for each node a removed grant covered, so their agents attest again and
  drop the key.
- ``sealed_key_rows`` / ``replace_sealed_key``: read every stored ciphertext, and swap one for its
  re-encryption only if the row still holds the ciphertext that was read (compare-and-set), so a
  concurrent ``key delete`` or a second rotation never loses or resurrects anything.
- ``add_admin_revocations`` / ``admin_revocation`` / ``list_admin_revocations``: revoked admin
  certificates (``kbs.admincert``), by serial, shared by every replica on the database. Adding is
  idempotent (a serial already recorded keeps its first row) and commits with its audit row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from kbs.errors import NotFound
from kbs.store_catalog import AuditEvent, Catalog
from kbs.store_db import admin_revocations, grants, keys, ts

__all__ = [
    "AdminRevocation",
    "DeletedKey",
    "SealedRow",
    "add_admin_revocations",
    "admin_revocation",
    "delete_key",
    "list_admin_revocations",
    "replace_sealed_key",
    "sealed_key_rows",
]

P = sa.bindparam
GET_REVOCATION = sa.select(admin_revocations).where(admin_revocations.c.serial == P("p_serial"))


@dataclass(frozen=True)
class DeletedKey:
    name: str
    versions: int
    grants: int
    nodes_notified: tuple[str, ...]


@dataclass(frozen=True)
class SealedRow:
    """One stored key version's ciphertext (sealed under the master key)."""

    name: str
    version: int
    encrypted_private: bytes


@dataclass(frozen=True)
class AdminRevocation:
    """A revoked admin certificate: its serial (lower-case hex), operator name, when."""

    serial: str
    name: str
    revoked_at: datetime


def delete_key(store: Catalog, name: str, now: datetime) -> DeletedKey:
    """Remove key ``name`` (all versions) and its grants; NotFound if there is no such key."""
    with store._tx() as db:
        selectors = store._grant_selectors(db, name)
        removed = db.execute(sa.delete(keys).where(keys.c.name == name)).rowcount
        if not removed:
            raise NotFound(f"no key named {name!r}; `keylease-kbs key list` shows the keys")
        db.execute(sa.delete(grants).where(grants.c.key_name == name))
        notified = store._notify_matching(db, selectors, "a key was deleted", now)
    return DeletedKey(name, int(removed), len(selectors), tuple(notified))


def sealed_key_rows(store: Catalog) -> list[SealedRow]:
    """Every version of every key with its ciphertext, by name then version."""
    with store._tx(write=False) as db:
        rows = db.execute(
            sa.select(keys.c.name, keys.c.version, keys.c.encrypted_private).order_by(
                keys.c.name, keys.c.version
            )
        ).all()
    return [SealedRow(str(n), int(v), bytes(b)) for n, v, b in rows]


def replace_sealed_key(store: Catalog, row: SealedRow, new_blob: bytes) -> bool:
    """Store ``new_blob`` for ``row``'s key version if it still holds ``row``'s ciphertext;
    False if the row changed or went away meanwhile."""
    with store._tx() as db:
        result = db.execute(
            sa.update(keys)
            .where(
                keys.c.name == row.name,
                keys.c.version == row.version,
                keys.c.encrypted_private == row.encrypted_private,
            )
            .values(encrypted_private=new_blob)
        )
    return bool(result.rowcount == 1)


def add_admin_revocations(
    store: Catalog, revocations: Sequence[AdminRevocation], audit: AuditEvent, now: datetime
) -> list[str]:
    """Record ``revocations`` and the ``audit`` row in one transaction; the serials that were
    not recorded before (one already there keeps its first row: calling again is harmless)."""
    added: list[str] = []
    with store._tx(catalog=False) as db:
        for r in revocations:
            stmt = store._upsert(admin_revocations).values(
                serial=r.serial, name=r.name, revoked_at=ts(r.revoked_at)
            )
            if db.execute(stmt.on_conflict_do_nothing().returning(sa.literal(1))).first():
                added.append(r.serial)
        store._write_audit(db, [audit], now)
    return added


def _revocation(row: sa.RowMapping) -> AdminRevocation:
    return AdminRevocation(
        str(row["serial"]), str(row["name"]), datetime.fromisoformat(row["revoked_at"])
    )


def admin_revocation(store: Catalog, serial: str) -> AdminRevocation | None:
    """The revocation of the admin certificate with ``serial``, or None if it is not revoked;
    one round trip, never cached (every admin RPC asks)."""
    with store._tx(write=False, single=True) as db:
        row = store._run(db, GET_REVOCATION, {"p_serial": serial}).mappings().first()
    return None if row is None else _revocation(row)


def list_admin_revocations(store: Catalog) -> list[AdminRevocation]:
    """Every revoked admin certificate, by name then serial."""
    query = sa.select(admin_revocations).order_by(
        admin_revocations.c.name, admin_revocations.c.serial
    )
    with store._tx(write=False, single=True) as db:
        rows = db.execute(query).mappings().all()
    return [_revocation(r) for r in rows]

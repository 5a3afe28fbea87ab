"""Store operations behind ``key delete`` and ``master-key rotate``.

Functions over ``kbs.store.Store`` (they use its transaction and change-feed helpers, like the
mixins in ``kbs.store_catalog``), kept here so that they need no change to the ``Store`` class:

- ``delete_key``: every version and every grant of a key go in one transaction, which also
  records a CHANGED row for each node a removed grant covered, so their agents attest again and
  drop the key.
- ``sealed_key_rows`` / ``replace_sealed_key``: read every stored ciphertext, and swap one for its
  re-encryption only if the row still holds the ciphertext that was read (compare-and-set), so a
  concurrent ``key delete`` or a second rotation never loses or resurrects anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from kbs.errors import NotFound
from kbs.store_catalog import Catalog
from kbs.store_db import grants, keys

__all__ = ["DeletedKey", "SealedRow", "delete_key", "replace_sealed_key", "sealed_key_rows"]


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

"""Image keys (every version, sealed under the master key) and the grants that release them.

Key ciphertext is sealed by the caller (``kbs.masterkey``) for the version it gets, inside the
transaction that stores it. A new key version, a grant added or removed and a key deleted record
a CHANGED row for every node they concern (``kbs.store.changes``) in the same transaction, so
those agents attest again. ``sealed_key_rows`` / ``replace_sealed_key`` serve ``master-key
rotate``: a row is swapped for its re-encryption only if it still holds the ciphertext that was
read (compare-and-set), so a concurrent ``key delete`` or a second rotation never loses or
resurrects anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from kbs.errors import NotFound, OperatorError
from kbs.model import DeletedKey, Grant, StoredKey, format_selector, selector_matches
from kbs.store.changes import notify_matching
from kbs.store.database import Database
from kbs.store.tables import dumps_map, grants, key_from_row, keys, loads_map, ts

__all__ = [
    "SealedRow",
    "add_grant",
    "add_sealed_key",
    "delete_key",
    "get_key",
    "granted_keys",
    "list_grants",
    "list_keys",
    "remove_grant",
    "replace_sealed_key",
    "sealed_key_rows",
]

_LATEST = (
    sa.select(keys.c.name, sa.func.max(keys.c.version).label("version"))
    .group_by(keys.c.name)
    .subquery()
)
# On the attestation path: compiled once per dialect (``Database.run``).
GRANTED_LATEST_KEYS = (
    sa.select(keys, grants.c.selector)
    .join(_LATEST, sa.and_(keys.c.name == _LATEST.c.name, keys.c.version == _LATEST.c.version))
    .join(grants, grants.c.key_name == keys.c.name)
    .order_by(keys.c.name)
)


@dataclass(frozen=True)
class SealedRow:
    """One stored key version's ciphertext (sealed under the master key)."""

    name: str
    version: int
    encrypted_private: bytes


def add_sealed_key(
    db: Database,
    name: str,
    algorithm: str,
    seal: Callable[[int], bytes],
    now: datetime,
    *,
    must_exist: bool | None = None,
) -> StoredKey:
    """Store the next version of key ``name``; ``seal(version)`` returns its ciphertext (it is
    called inside the transaction, so the version bound into the AAD is the stored one).

    ``must_exist=False`` refuses a name that exists (``key import``), ``True`` one that does not
    (``key rotate``). A second or later version records CHANGED for the nodes the key is granted
    to. Two writers racing for one version: the loser gets StoreConflict."""
    with db.tx() as conn:
        current = int(
            conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(keys.c.version), 0)).where(
                    keys.c.name == name
                )
            ).scalar_one()
        )
        if must_exist is False and current:
            raise OperatorError(
                f"key {name!r} already exists (version {current}); to release a new version "
                f"use `keylease-kbs key rotate {name} --private-key FILE`"
            )
        if must_exist and not current:
            raise NotFound(
                f"no key named {name!r} to rotate; import it first with `keylease-kbs key "
                f"import {name} --private-key FILE`"
            )
        version = current + 1
        conn.execute(
            keys.insert().values(
                name=name, version=version, algorithm=algorithm,
                encrypted_private=seal(version), created_at=ts(now),
            )
        )  # fmt: skip
        if version > 1:
            notify_matching(db, conn, _grant_selectors(conn, name), "a key was rotated", now)
    return StoredKey(name, version, algorithm, b"", now)


def _grant_selectors(conn: sa.Connection, key_name: str) -> list[dict[str, str]]:
    rows = conn.execute(sa.select(grants.c.selector).where(grants.c.key_name == key_name))
    return [loads_map(selector) for (selector,) in rows]


def list_keys(db: Database) -> list[StoredKey]:
    """Every version of every key, by name then version (ciphertext left out)."""
    query = sa.select(keys).order_by(keys.c.name, keys.c.version)
    with db.tx(write=False, single=True) as conn:
        rows = conn.execute(query).mappings().all()
    return [key_from_row(r, with_secret=False) for r in rows]


def get_key(db: Database, name: str) -> StoredKey | None:
    """The latest version of ``name``, with its ciphertext."""
    query = sa.select(keys).where(keys.c.name == name).order_by(keys.c.version.desc()).limit(1)
    with db.tx(write=False, single=True) as conn:
        row = conn.execute(query).mappings().first()
    return None if row is None else key_from_row(row)


def granted_keys(db: Database, labels: Mapping[str, str]) -> tuple[StoredKey, ...]:
    """Latest version of every key with a grant whose selector is within ``labels``: one
    statement, every grant joined to its key's latest version, filtered here."""
    with db.tx(write=False, single=True) as conn:
        rows = db.run(conn, GRANTED_LATEST_KEYS, {}).mappings().all()
    found: dict[str, StoredKey] = {}
    for row in rows:
        if row["name"] not in found and selector_matches(loads_map(row["selector"]), labels):
            found[row["name"]] = key_from_row(row)
    return tuple(found.values())


def delete_key(db: Database, name: str, now: datetime) -> DeletedKey:
    """Remove key ``name`` (all versions) and its grants, telling the nodes those grants
    covered; NotFound if there is no such key."""
    with db.tx() as conn:
        selectors = _grant_selectors(conn, name)
        removed = conn.execute(sa.delete(keys).where(keys.c.name == name)).rowcount
        if not removed:
            raise NotFound(f"no key named {name!r}; `keylease-kbs key list` shows the keys")
        conn.execute(sa.delete(grants).where(grants.c.key_name == name))
        notified = notify_matching(db, conn, selectors, "a key was deleted", now)
    return DeletedKey(name, int(removed), len(selectors), tuple(notified))


def sealed_key_rows(db: Database) -> list[SealedRow]:
    """Every version of every key with its ciphertext, by name then version."""
    with db.tx(write=False) as conn:
        rows = conn.execute(
            sa.select(keys.c.name, keys.c.version, keys.c.encrypted_private).order_by(
                keys.c.name, keys.c.version
            )
        ).all()
    return [SealedRow(str(n), int(v), bytes(b)) for n, v, b in rows]


def replace_sealed_key(db: Database, row: SealedRow, new_blob: bytes) -> bool:
    """Store ``new_blob`` for ``row``'s key version if it still holds ``row``'s ciphertext;
    False if the row changed or went away meanwhile."""
    with db.tx() as conn:
        result = conn.execute(
            sa.update(keys)
            .where(
                keys.c.name == row.name,
                keys.c.version == row.version,
                keys.c.encrypted_private == row.encrypted_private,
            )
            .values(encrypted_private=new_blob)
        )
    return bool(result.rowcount == 1)


def add_grant(db: Database, key_name: str, selector: Mapping[str, str], now: datetime) -> Grant:
    if not selector:
        raise OperatorError("a grant needs a non-empty selector")
    with db.tx() as conn:
        if conn.execute(sa.select(keys.c.name).where(keys.c.name == key_name)).first() is None:
            raise NotFound(
                f"no key named {key_name!r}; import it first with `keylease-kbs key import "
                f"{key_name} --private-key FILE`"
            )
        stmt = db.upsert(grants).values(
            key_name=key_name, selector=dumps_map(selector), created_at=ts(now)
        )
        if conn.execute(stmt.on_conflict_do_nothing().returning(sa.literal(1))).first() is None:
            raise OperatorError(
                f"key {key_name!r} is already granted to {format_selector(selector)}"
            )
        notify_matching(db, conn, [selector], "a key was granted", now)
    return Grant(key_name, dict(selector), now)


def remove_grant(db: Database, key_name: str, selector: Mapping[str, str], now: datetime) -> None:
    """Remove exactly this grant (same key, same selector). NotFound if there is none."""
    stmt = grants.delete().where(
        grants.c.key_name == key_name, grants.c.selector == dumps_map(selector)
    )
    with db.tx() as conn:
        if conn.execute(stmt).rowcount != 1:
            raise NotFound(
                f"key {key_name!r} is not granted to {format_selector(selector) or '-'}; "
                "`keylease-kbs grant list` shows the grants and their exact selectors"
            )
        notify_matching(db, conn, [selector], "a key grant was removed", now)


def list_grants(db: Database) -> list[Grant]:
    query = sa.select(grants).order_by(grants.c.key_name, grants.c.selector)
    with db.tx(write=False, single=True) as conn:
        rows = conn.execute(query).all()
    return [Grant(k, loads_map(s), datetime.fromisoformat(at)) for k, s, at in rows]

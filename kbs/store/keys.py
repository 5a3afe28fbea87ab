"""Image keys (every version, sealed under the master key) and the grants that release them.

Key ciphertext is sealed by the caller (``kbs.masterkey``) for the version it gets, inside the
transaction that stores it. Every version not retired is released to the nodes a grant covers;
the newest is the one images are encrypted to, and cannot be retired. A new key version, a
version retired, a grant added or removed and a key deleted record a CHANGED row for every node
they concern (``kbs.store.changes``) in the same transaction, so those agents attest again.
``sealed_key_rows`` / ``replace_sealed_key`` serve ``master-key rotate``: a row is swapped for
its re-encryption only if it still holds the ciphertext that was read (compare-and-set), so a
concurrent ``key delete`` or a second rotation never loses or resurrects anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from kbs.errors import NotFound, OperatorError
from kbs.model import (
    DeletedKey,
    Grant,
    KeyDetails,
    KeyHolder,
    KeyState,
    RetiredKey,
    StoredKey,
    format_selector,
    selector_matches,
)
from kbs.store.changes import notify_matching
from kbs.store.database import Database
from kbs.store.tables import (
    dumps_held,
    dumps_map,
    grants,
    key_from_row,
    keys,
    loads_held,
    loads_map,
    nodes,
    opt_dt,
    ts,
)

__all__ = [
    "SealedRow",
    "add_grant",
    "add_sealed_key",
    "delete_key",
    "get_key",
    "granted_keys",
    "key_details",
    "list_grants",
    "list_keys",
    "remove_grant",
    "replace_sealed_key",
    "retire_key",
    "sealed_key_rows",
]

# On the attestation path: compiled once per dialect (``Database.run``). Every version not
# retired, with each grant of its key.
GRANTED_KEYS = (
    sa.select(keys, grants.c.selector)
    .join(grants, grants.c.key_name == keys.c.name)
    .where(keys.c.retired_at.is_(None))
    .order_by(keys.c.name, keys.c.version)
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
    return StoredKey(name, version, algorithm, b"", now, KeyState.CURRENT)


def _grant_selectors(conn: sa.Connection, key_name: str) -> list[dict[str, str]]:
    rows = conn.execute(sa.select(grants.c.selector).where(grants.c.key_name == key_name))
    return [loads_map(selector) for (selector,) in rows]


def _with_states(rows: Iterable[sa.RowMapping], with_secret: bool) -> list[StoredKey]:
    """Rows ordered by name then version, as keys with their state (the last of a name is
    its current version)."""
    ordered = list(rows)
    return [
        key_from_row(
            row,
            current=i + 1 == len(ordered) or ordered[i + 1]["name"] != row["name"],
            with_secret=with_secret,
        )
        for i, row in enumerate(ordered)
    ]


def list_keys(db: Database) -> list[StoredKey]:
    """Every version of every key, by name then version, with its state (ciphertext left
    out)."""
    query = sa.select(keys).order_by(keys.c.name, keys.c.version)
    with db.tx(write=False, single=True) as conn:
        rows = conn.execute(query).mappings().all()
    return _with_states(rows, with_secret=False)


def get_key(db: Database, name: str) -> StoredKey | None:
    """The current (newest) version of ``name``, with its ciphertext."""
    query = sa.select(keys).where(keys.c.name == name).order_by(keys.c.version.desc()).limit(1)
    with db.tx(write=False, single=True) as conn:
        row = conn.execute(query).mappings().first()
    return None if row is None else key_from_row(row, current=True)


def granted_keys(db: Database, labels: Mapping[str, str]) -> tuple[StoredKey, ...]:
    """Every version not retired of every key with a grant whose selector is within
    ``labels``, by name then version: one statement, every grant joined to its key's released
    versions, filtered here."""
    with db.tx(write=False, single=True) as conn:
        rows = db.run(conn, GRANTED_KEYS, {}).mappings().all()
    matching: dict[tuple[str, int], sa.RowMapping] = {}
    for row in rows:
        if selector_matches(loads_map(row["selector"]), labels):
            matching.setdefault((row["name"], row["version"]), row)
    return tuple(_with_states(matching.values(), with_secret=True))


def retire_key(db: Database, name: str, version: int, now: datetime) -> RetiredKey:
    """Stop releasing version ``version`` of ``name`` and tell the nodes its grants cover
    (they attest again and remove its file). The current version is refused (rotate first), as
    are an unknown or already retired version."""
    with db.tx() as conn:
        rows = conn.execute(
            sa.select(keys).where(keys.c.name == name).order_by(keys.c.version)
        ).mappings().all()  # fmt: skip
        if not rows:
            raise NotFound(f"no key named {name!r}; `keylease-kbs key list` shows the keys")
        found = {row["version"]: row for row in rows}
        newest = rows[-1]["version"]
        if version not in found:
            listed = ", ".join(str(v) for v in found)
            raise NotFound(f"key {name!r} has no version {version} (versions: {listed})")
        if version == newest:
            raise OperatorError(
                f"version {version} is key {name!r}'s current version, the one new images are "
                f"encrypted to; rotate first (`keylease-kbs key rotate {name} --private-key "
                f"FILE`), re-encrypt or rebuild the images still encrypted to version "
                f"{version}, then retire it"
            )
        retired_at = opt_dt(found[version]["retired_at"])
        if retired_at is not None:
            raise OperatorError(
                f"version {version} of key {name!r} was already retired at "
                f"{retired_at.isoformat(timespec='seconds')}"
            )
        conn.execute(
            keys.update()
            .where(keys.c.name == name, keys.c.version == version)
            .values(retired_at=ts(now))
        )
        notified = notify_matching(
            db, conn, _grant_selectors(conn, name), "a key version was retired", now
        )
        row = conn.execute(
            sa.select(keys).where(keys.c.name == name, keys.c.version == version)
        ).mappings().one()  # fmt: skip
    key = key_from_row(row, current=False, with_secret=False)
    return RetiredKey(key, tuple(notified))


def _holding(conn: sa.Connection, name: str) -> list[tuple[str, str, str | None, str | None]]:
    """(node, held keys, lease until, last attested) of the nodes whose held keys may include
    ``name`` (a text prefilter; the caller parses)."""
    n = nodes.c
    query = (
        sa.select(n.name, n.held_keys, n.lease_until, n.last_attested_at)
        .where(n.held_keys.contains(f'"{name}"', autoescape=True))
        .order_by(n.name)
    )
    return [(str(a), str(b), c, d) for a, b, c, d in conn.execute(query).all()]


def key_details(db: Database, name: str, now: datetime) -> KeyDetails:
    """Every version of ``name`` with its state, its grants' selectors, and the nodes whose
    latest release gave them a version of it and whose lease has not ended. NotFound if there
    is no such key."""
    with db.tx(write=False) as conn:
        rows = conn.execute(
            sa.select(keys).where(keys.c.name == name).order_by(keys.c.version)
        ).mappings().all()  # fmt: skip
        if not rows:
            raise NotFound(f"no key named {name!r}; `keylease-kbs key list` shows the keys")
        selectors = sorted(_grant_selectors(conn, name), key=format_selector)
        holding = _holding(conn, name)
    holders: list[KeyHolder] = []
    for node, held, lease_until, released_at in holding:
        until = opt_dt(lease_until)
        versions = tuple(sorted(v for n, v in loads_held(held) if n == name))
        if versions and until is not None and until > now and released_at is not None:
            holders.append(KeyHolder(node, versions, datetime.fromisoformat(released_at), until))
    return KeyDetails(
        name=name,
        versions=tuple(_with_states(rows, with_secret=False)),
        grants=tuple(selectors),
        holders=tuple(holders),
    )


def delete_key(db: Database, name: str, now: datetime) -> DeletedKey:
    """Remove key ``name`` (all versions) and its grants, telling the nodes those grants
    covered; NotFound if there is no such key."""
    with db.tx() as conn:
        selectors = _grant_selectors(conn, name)
        removed = conn.execute(sa.delete(keys).where(keys.c.name == name)).rowcount
        if not removed:
            raise NotFound(f"no key named {name!r}; `keylease-kbs key list` shows the keys")
        conn.execute(sa.delete(grants).where(grants.c.key_name == name))
        for node, held, _until, _at in _holding(conn, name):  # a new key of this name is not
            kept = [(n, v) for n, v in loads_held(held) if n != name]  # what they hold
            conn.execute(
                nodes.update().where(nodes.c.name == node).values(held_keys=dumps_held(kept))
            )
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

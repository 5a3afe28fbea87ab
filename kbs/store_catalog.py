"""The broker database's catalogue tables: EK allowlist, keys, grants, policies, audit log.

Part of ``kbs.store.Store`` (see ``kbs.store_db`` for storage conventions). Key ciphertext is
sealed by the caller under the master key; ``list_audit`` returns entries oldest first. A new key
version, a grant added or removed and a policy set or assigned record a CHANGED row for every
node they concern (``kbs.store_changes``) in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from kbs.errors import NotFound, OperatorError
from kbs.model import AuditEntry, Grant, Policy, StoredKey, format_selector, selector_matches
from kbs.store_cache import LabelCache
from kbs.store_changes import Changes
from kbs.store_db import (
    allowlist,
    audit_log,
    dumps_map,
    dumps_pcrs,
    grants,
    key_from_row,
    keys,
    loads_map,
    loads_pcrs,
    policies,
    policy_assignments,
    ts,
)

__all__ = ["AuditEvent", "Catalog"]

P = sa.bindparam
# The attestation path's statements, compiled once per dialect (``Database._run``).
AUDIT = audit_log.insert().values(
    at=P("p_at"), actor=P("p_actor"), event=P("p_event"), node=P("p_node"),
    result=P("p_result"), detail=P("p_detail"),
)  # fmt: skip
_LATEST = (
    sa.select(keys.c.name, sa.func.max(keys.c.version).label("version"))
    .group_by(keys.c.name)
    .subquery()
)
GRANTED_LATEST_KEYS = (
    sa.select(keys, grants.c.selector)
    .join(_LATEST, sa.and_(keys.c.name == _LATEST.c.name, keys.c.version == _LATEST.c.version))
    .join(grants, grants.c.key_name == keys.c.name)
    .order_by(keys.c.name)
)
ALL_POLICIES = (
    sa.select(policies, policy_assignments.c.selector)
    .outerjoin(policy_assignments, policy_assignments.c.policy_name == policies.c.name)
    .order_by(policies.c.name, policy_assignments.c.selector)
)
ONE_POLICY = ALL_POLICIES.where(policies.c.name == P("p_name"))


@dataclass(frozen=True)
class AuditEvent:
    """One audit row to write (its time is the transaction's ``now``)."""

    actor: str
    event: str
    node: str | None
    result: str
    detail: str


class Catalog(Changes):
    """Allowlist, keys, grants, policies and audit; part of ``kbs.store.Store``."""

    def __init__(self, engine: sa.Engine, where: str) -> None:
        super().__init__(engine, where)
        self._policy_cache: LabelCache[tuple[Policy, ...]] = LabelCache(self.last_change_id)
        self._key_cache: LabelCache[tuple[StoredKey, ...]] = LabelCache(self.last_change_id)

    def _catalog_changed(self) -> None:
        self._policy_cache.clear()
        self._key_cache.clear()

    def _upsert(self, table: sa.Table) -> Any:
        """``INSERT ... ON CONFLICT`` for this dialect (``on_conflict_do_nothing``/``_update``)."""
        return (sqlite.insert if self.is_sqlite else postgresql.insert)(table)

    # --- allowlist --------------------------------------------------------------------------

    def is_ek_allowed(self, ek_hash: str) -> bool:
        with self._tx(write=False, single=True) as db:
            row = db.execute(sa.select(sa.literal(1)).where(allowlist.c.ek_hash == ek_hash)).first()
        return row is not None

    def allow_ek(self, ek_hash: str, now: datetime) -> bool:
        """Register an EK hash; False if it was already registered."""
        stmt = self._upsert(allowlist).values(ek_hash=ek_hash, added_at=ts(now))
        with self._tx(single=True) as db:
            return (
                db.execute(stmt.on_conflict_do_nothing().returning(sa.literal(1))).first()
                is not None
            )

    def list_allowlist(self) -> list[tuple[str, datetime]]:
        query = sa.select(allowlist).order_by(allowlist.c.added_at, allowlist.c.ek_hash)
        with self._tx(write=False, single=True) as db:
            rows = db.execute(query).all()
        return [(ek, datetime.fromisoformat(at)) for ek, at in rows]

    # --- keys and grants --------------------------------------------------------------------

    def add_sealed_key(
        self,
        name: str,
        algorithm: str,
        seal: Callable[[int], bytes],
        now: datetime,
        *,
        must_exist: bool | None = None,
    ) -> StoredKey:
        """Store the next version of key ``name``; ``seal(version)`` returns its ciphertext (it
        is called inside the transaction, so the version bound into the AAD is the stored one).

        ``must_exist=False`` refuses a name that exists (``key import``), ``True`` one that does
        not (``key rotate``). A second or later version records CHANGED for the nodes the key is
        granted to. Two writers racing for one version: the loser gets StoreConflict."""
        with self._tx() as db:
            current = int(
                db.execute(
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
            db.execute(
                keys.insert().values(
                    name=name, version=version, algorithm=algorithm,
                    encrypted_private=seal(version), created_at=ts(now),
                )
            )  # fmt: skip
            if version > 1:
                self._notify_matching(db, self._grant_selectors(db, name), "a key was rotated", now)
        return StoredKey(name, version, algorithm, b"", now)

    def _grant_selectors(self, db: sa.Connection, key_name: str) -> list[dict[str, str]]:
        rows = db.execute(sa.select(grants.c.selector).where(grants.c.key_name == key_name))
        return [loads_map(selector) for (selector,) in rows]

    def add_key(
        self, name: str, algorithm: str, encrypted_private: bytes, now: datetime
    ) -> StoredKey:
        """Store the next version of ``name``. The ciphertext must be sealed for that version
        (``key_aad(name, version)``); prefer ``add_sealed_key``, which cannot get it wrong."""
        return self.add_sealed_key(name, algorithm, lambda _version: encrypted_private, now)

    def list_keys(self) -> list[StoredKey]:
        """Every version of every key, by name then version (ciphertext left out)."""
        query = sa.select(keys).order_by(keys.c.name, keys.c.version)
        with self._tx(write=False, single=True) as db:
            rows = db.execute(query).mappings().all()
        return [key_from_row(r, with_secret=False) for r in rows]

    def get_key(self, name: str) -> StoredKey | None:
        """The latest version of ``name``, with its ciphertext."""
        query = sa.select(keys).where(keys.c.name == name).order_by(keys.c.version.desc()).limit(1)
        with self._tx(write=False, single=True) as db:
            row = db.execute(query).mappings().first()
        return None if row is None else key_from_row(row)

    def keys_for_labels(self, labels: Mapping[str, str]) -> list[StoredKey]:
        """Latest version of every key with a grant whose selector is within ``labels``.

        One statement: every grant joined to its key's latest version, filtered here; cached
        per label set (``kbs.store_cache``)."""
        if not labels:
            return []
        return list(self._key_cache.get(labels, lambda: self._keys_for_labels(labels)))

    def _keys_for_labels(self, labels: Mapping[str, str]) -> tuple[StoredKey, ...]:
        with self._tx(write=False, single=True) as db:
            rows = self._run(db, GRANTED_LATEST_KEYS, {}).mappings().all()
        found: dict[str, StoredKey] = {}
        for row in rows:
            if row["name"] not in found and selector_matches(loads_map(row["selector"]), labels):
                found[row["name"]] = key_from_row(row)
        return tuple(found.values())

    def add_grant(self, key_name: str, selector: Mapping[str, str], now: datetime) -> Grant:
        if not selector:
            raise OperatorError("a grant needs a non-empty selector")
        with self._tx() as db:
            if db.execute(sa.select(keys.c.name).where(keys.c.name == key_name)).first() is None:
                raise NotFound(
                    f"no key named {key_name!r}; import it first with `keylease-kbs key import "
                    f"{key_name} --private-key FILE`"
                )
            stmt = self._upsert(grants).values(
                key_name=key_name, selector=dumps_map(selector), created_at=ts(now)
            )
            if db.execute(stmt.on_conflict_do_nothing().returning(sa.literal(1))).first() is None:
                raise OperatorError(
                    f"key {key_name!r} is already granted to {format_selector(selector)}"
                )
            self._notify_matching(db, [selector], "a key was granted", now)
        return Grant(key_name, dict(selector), now)

    def remove_grant(self, key_name: str, selector: Mapping[str, str], now: datetime) -> None:
        """Remove exactly this grant (same key, same selector). NotFound if there is none."""
        stmt = grants.delete().where(
            grants.c.key_name == key_name, grants.c.selector == dumps_map(selector)
        )
        with self._tx() as db:
            if db.execute(stmt).rowcount != 1:
                raise NotFound(
                    f"key {key_name!r} is not granted to {format_selector(selector) or '-'}; "
                    "`keylease-kbs grant list` shows the grants and their exact selectors"
                )
            self._notify_matching(db, [selector], "a key grant was removed", now)

    def list_grants(self) -> list[Grant]:
        query = sa.select(grants).order_by(grants.c.key_name, grants.c.selector)
        with self._tx(write=False, single=True) as db:
            rows = db.execute(query).all()
        return [Grant(k, loads_map(s), datetime.fromisoformat(at)) for k, s, at in rows]

    # --- policies ---------------------------------------------------------------------------

    def _policies(self, db: sa.Connection, name: str | None = None) -> list[Policy]:
        """Policies (all, or the one named) with their assignments: one statement."""
        if name is None:
            result = self._run(db, ALL_POLICIES, {})
        else:
            result = self._run(db, ONE_POLICY, {"p_name": name})
        rows: dict[str, tuple[sa.RowMapping, list[dict[str, str]]]] = {}
        for row in result.mappings():
            entry = rows.setdefault(row["name"], (row, []))
            if row["selector"] is not None:
                entry[1].append(loads_map(row["selector"]))
        return [
            Policy(n, r["pcr_bank"], loads_pcrs(r["pcrs"]), tuple(sels))
            for n, (r, sels) in rows.items()
        ]

    def set_policy(self, name: str, bank: str, pcrs: Mapping[int, bytes], now: datetime) -> Policy:
        """Create or replace a policy's reference values (its assignments are kept)."""
        if not pcrs:
            raise OperatorError("a policy needs at least one PCR; empty policy means deny")
        stmt = self._upsert(policies).values(
            name=name, pcr_bank=bank, pcrs=dumps_pcrs(pcrs), updated_at=ts(now)
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[policies.c.name],
            set_={c: stmt.excluded[c] for c in ("pcr_bank", "pcrs", "updated_at")},
        )
        with self._tx() as db:
            db.execute(stmt)
            policy = self._policies(db, name)[0]
            self._notify_matching(db, policy.selectors, "an attestation policy changed", now)
            return policy

    def assign_policy(self, name: str, selector: Mapping[str, str], now: datetime) -> Policy:
        if not selector:
            raise OperatorError("a policy assignment needs a non-empty selector")
        stmt = self._upsert(policy_assignments).values(
            policy_name=name, selector=dumps_map(selector), created_at=ts(now)
        )
        with self._tx() as db:
            if not self._policies(db, name):
                raise NotFound(
                    f"no policy named {name!r}; create it with `keylease-kbs policy set {name} "
                    "--pcrs 0,1,... --from-node NODE`"
                )
            if db.execute(stmt.on_conflict_do_nothing().returning(sa.literal(1))).first() is None:
                raise OperatorError(
                    f"policy {name!r} is already assigned to {format_selector(selector)}"
                )
            self._notify_matching(db, [selector], "an attestation policy was assigned", now)
            return self._policies(db, name)[0]

    def list_policies(self) -> list[Policy]:
        with self._tx(write=False, single=True) as db:
            return self._policies(db)

    def policies_for_labels(self, labels: Mapping[str, str]) -> list[Policy]:
        """Policies with an assignment whose selector is within ``labels``, by name; cached per
        label set (``kbs.store_cache``)."""
        return list(self._policy_cache.get(labels, lambda: self._policies_for_labels(labels)))

    def _policies_for_labels(self, labels: Mapping[str, str]) -> tuple[Policy, ...]:
        return tuple(
            p for p in self.list_policies() if any(selector_matches(s, labels) for s in p.selectors)
        )

    # --- audit ------------------------------------------------------------------------------

    def audit(
        self,
        *,
        actor: str,
        event: str,
        node: str | None,
        result: str,
        detail: str,
        now: datetime,
    ) -> None:
        with self._tx(single=True, catalog=False) as db:
            self._write_audit(db, [AuditEvent(actor, event, node, result, detail)], now)

    def _write_audit(self, db: sa.Connection, events: Sequence[AuditEvent], now: datetime) -> None:
        at = ts(now)
        for e in events:
            params = {"p_at": at, "p_actor": e.actor, "p_event": e.event, "p_node": e.node,
                      "p_result": e.result, "p_detail": e.detail}  # fmt: skip
            self._run(db, AUDIT, params)

    def list_audit(self, node: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """The ``limit`` most recent entries (for ``node`` if given), oldest first."""
        query = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(max(limit, 0))
        if node is not None:
            query = query.where(audit_log.c.node == node)
        with self._tx(write=False, single=True) as db:
            rows = db.execute(query).mappings().all()
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

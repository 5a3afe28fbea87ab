"""The broker database's catalogue tables: EK allowlist, keys, grants, policies, audit log.

Part of ``kbs.store.Store`` (see ``kbs.store_db`` for storage conventions). Key ciphertext is
sealed by the caller under the master key; ``list_audit`` returns entries oldest first. A new key
version, a grant added or removed and a policy set or assigned record a CHANGED row for every
node they concern (``kbs.store_changes``) in the same transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from kbs.errors import NotFound, OperatorError
from kbs.model import AuditEntry, Grant, Policy, StoredKey, format_selector, selector_matches
from kbs.store_changes import Changes
from kbs.store_db import dumps_map, dumps_pcrs, key_from_row, loads_map, loads_pcrs, ts

__all__ = ["Catalog"]


class Catalog(Changes):
    """Allowlist, keys, grants, policies and audit; part of ``kbs.store.Store``."""

    # --- allowlist --------------------------------------------------------------------------

    def is_ek_allowed(self, ek_hash: str) -> bool:
        with self._tx(write=False) as db:
            row = db.execute("SELECT 1 FROM allowlist WHERE ek_hash = ?", (ek_hash,)).fetchone()
        return row is not None

    def allow_ek(self, ek_hash: str, now: datetime) -> bool:
        """Register an EK hash; False if it was already registered."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO allowlist (ek_hash, added_at) VALUES (?, ?)",
                (ek_hash, ts(now)),
            )
            return cursor.rowcount == 1

    def list_allowlist(self) -> list[tuple[str, datetime]]:
        with self._tx(write=False) as db:
            rows = db.execute("SELECT ek_hash, added_at FROM allowlist ORDER BY added_at, ek_hash")
            return [(r["ek_hash"], datetime.fromisoformat(r["added_at"])) for r in rows]

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
        granted to."""
        with self._tx() as db:
            row = db.execute(
                "SELECT COALESCE(MAX(version), 0) AS v FROM keys WHERE name = ?", (name,)
            ).fetchone()
            current = int(row["v"])
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
                "INSERT INTO keys (name, version, algorithm, encrypted_private, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, version, algorithm, seal(version), ts(now)),
            )
            if version > 1:
                self._notify_matching(db, self._grant_selectors(db, name), "a key was rotated", now)
        return StoredKey(name, version, algorithm, b"", now)

    def _grant_selectors(self, db: sqlite3.Connection, key_name: str) -> list[dict[str, str]]:
        rows = db.execute("SELECT selector FROM grants WHERE key_name = ?", (key_name,))
        return [loads_map(r["selector"]) for r in rows]

    def add_key(
        self, name: str, algorithm: str, encrypted_private: bytes, now: datetime
    ) -> StoredKey:
        """Store the next version of ``name``. The ciphertext must be sealed for that version
        (``key_aad(name, version)``); prefer ``add_sealed_key``, which cannot get it wrong."""
        return self.add_sealed_key(name, algorithm, lambda _version: encrypted_private, now)

    def list_keys(self) -> list[StoredKey]:
        """Every version of every key, by name then version (ciphertext left out)."""
        with self._tx(write=False) as db:
            rows = db.execute("SELECT * FROM keys ORDER BY name, version")
            return [key_from_row(r, with_secret=False) for r in rows]

    def get_key(self, name: str) -> StoredKey | None:
        """The latest version of ``name``, with its ciphertext."""
        with self._tx(write=False) as db:
            row = db.execute(
                "SELECT * FROM keys WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
        return None if row is None else key_from_row(row)

    def keys_for_labels(self, labels: Mapping[str, str]) -> list[StoredKey]:
        """Latest version of every key with a grant whose selector is within ``labels``."""
        if not labels:
            return []
        with self._tx(write=False) as db:
            names = sorted(
                {
                    r["key_name"]
                    for r in db.execute("SELECT key_name, selector FROM grants")
                    if selector_matches(loads_map(r["selector"]), labels)
                }
            )
            keys = []
            for name in names:
                row = db.execute(
                    "SELECT * FROM keys WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
                ).fetchone()
                if row is not None:
                    keys.append(key_from_row(row))
            return keys

    def add_grant(self, key_name: str, selector: Mapping[str, str], now: datetime) -> Grant:
        if not selector:
            raise OperatorError("a grant needs a non-empty selector")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM keys WHERE name = ?", (key_name,)).fetchone() is None:
                raise NotFound(
                    f"no key named {key_name!r}; import it first with `keylease-kbs key import "
                    f"{key_name} --private-key FILE`"
                )
            cursor = db.execute(
                "INSERT OR IGNORE INTO grants (key_name, selector, created_at) VALUES (?, ?, ?)",
                (key_name, dumps_map(selector), ts(now)),
            )
            if cursor.rowcount != 1:
                raise OperatorError(
                    f"key {key_name!r} is already granted to {format_selector(selector)}"
                )
            self._notify_matching(db, [selector], "a key was granted", now)
        return Grant(key_name, dict(selector), now)

    def remove_grant(self, key_name: str, selector: Mapping[str, str], now: datetime) -> None:
        """Remove exactly this grant (same key, same selector). NotFound if there is none."""
        with self._tx() as db:
            cursor = db.execute(
                "DELETE FROM grants WHERE key_name = ? AND selector = ?",
                (key_name, dumps_map(selector)),
            )
            if cursor.rowcount != 1:
                raise NotFound(
                    f"key {key_name!r} is not granted to {format_selector(selector) or '-'}; "
                    "`keylease-kbs grant list` shows the grants and their exact selectors"
                )
            self._notify_matching(db, [selector], "a key grant was removed", now)

    def list_grants(self) -> list[Grant]:
        with self._tx(write=False) as db:
            rows = db.execute("SELECT * FROM grants ORDER BY key_name, selector")
            return [
                Grant(
                    r["key_name"], loads_map(r["selector"]), datetime.fromisoformat(r["created_at"])
                )
                for r in rows
            ]

    # --- policies ---------------------------------------------------------------------------

    def _policy(self, db: sqlite3.Connection, row: sqlite3.Row) -> Policy:
        selectors = tuple(
            loads_map(r["selector"])
            for r in db.execute(
                "SELECT selector FROM policy_assignments WHERE policy_name = ? ORDER BY selector",
                (row["name"],),
            )
        )
        return Policy(row["name"], row["pcr_bank"], loads_pcrs(row["pcrs"]), selectors)

    def set_policy(self, name: str, bank: str, pcrs: Mapping[int, bytes], now: datetime) -> Policy:
        """Create or replace a policy's reference values (its assignments are kept)."""
        if not pcrs:
            raise OperatorError("a policy needs at least one PCR; empty policy means deny")
        with self._tx() as db:
            db.execute(
                "INSERT INTO policies (name, pcr_bank, pcrs, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET pcr_bank = excluded.pcr_bank, "
                "pcrs = excluded.pcrs, updated_at = excluded.updated_at",
                (name, bank, dumps_pcrs(pcrs), ts(now)),
            )
            row = db.execute("SELECT * FROM policies WHERE name = ?", (name,)).fetchone()
            policy = self._policy(db, row)
            self._notify_matching(db, policy.selectors, "an attestation policy changed", now)
            return policy

    def assign_policy(self, name: str, selector: Mapping[str, str], now: datetime) -> Policy:
        if not selector:
            raise OperatorError("a policy assignment needs a non-empty selector")
        with self._tx() as db:
            row = db.execute("SELECT * FROM policies WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(
                    f"no policy named {name!r}; create it with `keylease-kbs policy set {name} "
                    "--pcrs 0,1,... --from-node NODE`"
                )
            cursor = db.execute(
                "INSERT OR IGNORE INTO policy_assignments (policy_name, selector, created_at) "
                "VALUES (?, ?, ?)",
                (name, dumps_map(selector), ts(now)),
            )
            if cursor.rowcount != 1:
                raise OperatorError(
                    f"policy {name!r} is already assigned to {format_selector(selector)}"
                )
            self._notify_matching(db, [selector], "an attestation policy was assigned", now)
            return self._policy(db, row)

    def list_policies(self) -> list[Policy]:
        with self._tx(write=False) as db:
            rows = db.execute("SELECT * FROM policies ORDER BY name").fetchall()
            return [self._policy(db, r) for r in rows]

    def policies_for_labels(self, labels: Mapping[str, str]) -> list[Policy]:
        """Policies with an assignment whose selector is within ``labels``, by name."""
        return [
            p for p in self.list_policies() if any(selector_matches(s, labels) for s in p.selectors)
        ]

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
        with self._tx() as db:
            db.execute(
                "INSERT INTO audit (at, actor, event, node, result, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (ts(now), actor, event, node, result, detail),
            )

    def list_audit(self, node: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """The ``limit`` most recent entries (for ``node`` if given), oldest first."""
        query = "SELECT * FROM audit"
        params: list[Any] = []
        if node is not None:
            query += " WHERE node = ?"
            params.append(node)
        query += " ORDER BY id DESC LIMIT ?"
        params.append(max(limit, 0))
        with self._tx(write=False) as db:
            rows = db.execute(query, params).fetchall()
        return [
            AuditEntry(
                id=r["id"],
                at=datetime.fromisoformat(r["at"]),
                actor=r["actor"],
                event=r["event"],
                node=r["node"],
                result=r["result"],
                detail=r["detail"],
            )
            for r in reversed(rows)
        ]

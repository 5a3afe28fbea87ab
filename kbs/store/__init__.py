"""The broker's database: SQLite (WAL) or PostgreSQL, one transaction per call, frozen values out.

``Store`` is the one entry point the rest of the broker uses. It holds a ``Database`` (engine,
transactions, error translation: ``kbs.store.database``), migrates it at open
(``kbs.store.migrate``) and hands each call to the module of its concern: ``nodes``,
``enrollments`` (challenges, EK allowlist), ``nonces``, ``keys`` (and grants), ``policies``,
``approvals`` (approved boot states), ``audit``, ``changes`` (the feed behind Watch),
``revocations`` (admin certificates). The
attestation path's two catalogue lookups are cached per label set (``kbs.store.cache``).
Thread-safe; every database error becomes ``StoreError``.

Several brokers may share one PostgreSQL database. What is atomic, per call:
``consume_nonce`` is one ``DELETE ... RETURNING`` (a nonce is accepted once, by one replica);
``take_enrollment`` likewise; ``enroll_node`` is one transaction under the ``nodes`` unique
constraints, retried once on a race, so one name or EK never yields two nodes; operator changes
and their change-feed rows commit together. An attestation is several calls (nonce, then
``record_attestation`` with the audit rows of its outcome, one transaction): a broker killed
between them leaves the nonce used and no record of that attempt, which is by design (the nonce
is spent either way, nothing released).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from kbs.model import (
    ApprovedState,
    AuditEntry,
    BootRecord,
    Change,
    ChangeKind,
    DeletedKey,
    Grant,
    KeyDetails,
    Node,
    NodeState,
    PendingEnrollment,
    Policy,
    RetiredKey,
    StoredKey,
)
from kbs.policy.rules import Document
from kbs.store import (
    approvals,
    audit,
    changes,
    enrollments,
    keys,
    nodes,
    nonces,
    policies,
    revocations,
)
from kbs.store.approvals import StatePush
from kbs.store.audit import AuditEvent
from kbs.store.cache import LabelCache
from kbs.store.database import BUSY_TIMEOUT, Database
from kbs.store.expiry import PurgeTimer
from kbs.store.keys import SealedRow
from kbs.store.migrate import migrate, schema_version
from kbs.store.nodes import BootUpdate, ReleaseBinding
from kbs.store.revocations import AdminRevocation

__all__ = [
    "BUSY_TIMEOUT",
    "AdminRevocation",
    "AuditEvent",
    "BootUpdate",
    "ReleaseBinding",
    "SealedRow",
    "StatePush",
    "Store",
]


class Store:
    """The database. Open with ``Store.open(path_or_url)``; a context manager, or ``close()``."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._nonce_purge = PurgeTimer()
        self._enrollment_purge = PurgeTimer()
        last_change: Callable[[], int] = lambda: changes.last_change_id(database)  # noqa: E731
        self._policy_cache: LabelCache[tuple[Policy, ...]] = LabelCache(last_change)
        self._key_cache: LabelCache[tuple[StoredKey, ...]] = LabelCache(last_change)
        database.on_catalog_write(self._policy_cache.clear)
        database.on_catalog_write(self._key_cache.clear)

    @classmethod
    def open(cls, target: Path | str) -> Self:
        """Open and migrate the database: a SQLite file path (created 0600 if new), or a
        ``postgresql://`` / ``sqlite:///`` URL."""
        database = Database.connect(target)
        try:
            migrate(database)
        except BaseException:
            database.close()
            raise
        return cls(database)

    @property
    def is_sqlite(self) -> bool:
        return self.database.is_sqlite

    def schema_version(self) -> str:
        return schema_version(self.database)

    def ping(self) -> None:
        self.database.ping()

    def close(self) -> None:
        self.database.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()

    # --- nodes (``kbs.store.nodes``) ---------------------------------------------------------

    def get_node(self, name: str) -> Node | None:
        return nodes.get_node(self.database, name)

    def list_nodes(self) -> list[Node]:
        return nodes.list_nodes(self.database)

    def count_nodes_by_state(self) -> dict[NodeState, int]:
        return nodes.count_nodes_by_state(self.database)

    def node_by_ek(self, ek_hash: str) -> Node | None:
        return nodes.node_by_ek(self.database, ek_hash)

    def enroll_node(
        self, *, name: str, ek_hash: str, ek_public: bytes, ek_certificate: bytes,
        ak_public: bytes, state: NodeState, metadata: Mapping[str, str], now: datetime,
        node_key: bytes | None = None,
    ) -> Node:  # fmt: skip
        return nodes.enroll_node(
            self.database, name=name, ek_hash=ek_hash, ek_public=ek_public,
            ek_certificate=ek_certificate, ak_public=ak_public, state=state, metadata=metadata,
            node_key=node_key, now=now,
        )  # fmt: skip

    def node_key(self, name: str) -> bytes | None:
        """The node's key, sealed under the master key (``kbs.nodeapi.nodeauth`` opens it)."""
        return nodes.node_key(self.database, name)

    def approve_node(self, name: str, labels: Mapping[str, str], now: datetime) -> Node:
        """Approve a node and replace its labels (a CHANGED row for it). NotFound if unknown."""
        return nodes.set_state(self.database, name, NodeState.APPROVED, labels, now)

    def revoke_node(self, name: str, now: datetime) -> Node:
        """Revoke a node and drop its outstanding nonces and challenges (a REVOKED row for it).
        NotFound if unknown."""
        return nodes.set_state(self.database, name, NodeState.REVOKED, None, now)

    def record_attestation(
        self, name: str, *, banks: Mapping[str, Mapping[int, bytes]], reset_count: int | None,
        restart_count: int | None, now: datetime, events: Sequence[AuditEvent] = (),
        held: Sequence[tuple[str, int]] | None = (), lease_until: datetime | None = None,
        boot: BootUpdate | None = None, denial: str | None = None,
        binding: ReleaseBinding | None = None, states: Sequence[ApprovedState] | None = None,
    ) -> None:  # fmt: skip
        nodes.record_attestation(
            self.database, name, banks=banks, reset_count=reset_count,
            restart_count=restart_count, now=now, events=events, held=held,
            lease_until=lease_until, boot=boot, denial=denial, binding=binding, states=states,
        )  # fmt: skip

    def approved_states(self, name: str) -> list[ApprovedState]:
        """The boot states the broker signs approvals for, for node ``name`` (oldest first)."""
        return approvals.node_states(self.database, name)

    def boot_record(self, name: str) -> BootRecord | None:
        """The boot state of the node's last verified event log (None: it sent none)."""
        return nodes.boot_record(self.database, name)

    def boot_records(self) -> dict[str, BootRecord]:
        """Every node's boot record, by node name."""
        return nodes.boot_records(self.database)

    # --- nonces and enrollment (``kbs.store.nonces``, ``kbs.store.enrollments``) ---------------

    def add_nonce(self, node_name: str, nonce: bytes, expires_at: datetime) -> None:
        nonces.add_nonce(self.database, self._nonce_purge, node_name, nonce, expires_at)

    def consume_nonce(self, node_name: str, nonce: bytes, now: datetime) -> None:
        nonces.consume_nonce(self.database, node_name, nonce, now)

    def add_enrollment(self, pending: PendingEnrollment) -> None:
        enrollments.add_enrollment(self.database, self._enrollment_purge, pending)

    def take_enrollment(self, enrollment_id: str, now: datetime) -> PendingEnrollment:
        return enrollments.take_enrollment(self.database, enrollment_id, now)

    def is_ek_allowed(self, ek_hash: str) -> bool:
        return enrollments.is_ek_allowed(self.database, ek_hash)

    def allow_ek(self, ek_hash: str, now: datetime) -> bool:
        return enrollments.allow_ek(self.database, ek_hash, now)

    def list_allowlist(self) -> list[tuple[str, datetime]]:
        return enrollments.list_allowlist(self.database)

    # --- keys and grants (``kbs.store.keys``) --------------------------------------------------

    def add_sealed_key(
        self, name: str, algorithm: str, seal: Callable[[int], bytes], now: datetime, *,
        must_exist: bool | None = None,
    ) -> StoredKey:  # fmt: skip
        return keys.add_sealed_key(self.database, name, algorithm, seal, now, must_exist=must_exist)

    def add_key(
        self, name: str, algorithm: str, encrypted_private: bytes, now: datetime
    ) -> StoredKey:
        """Store the next version of ``name``. The ciphertext must be sealed for that version
        (``key_aad(name, version)``); prefer ``add_sealed_key``, which cannot get it wrong."""
        return self.add_sealed_key(name, algorithm, lambda _version: encrypted_private, now)

    def list_keys(self) -> list[StoredKey]:
        return keys.list_keys(self.database)

    def get_key(self, name: str) -> StoredKey | None:
        return keys.get_key(self.database, name)

    def keys_for_labels(self, labels: Mapping[str, str]) -> list[StoredKey]:
        """Every version not retired of every key granted to ``labels``; cached per label
        set."""
        if not labels:
            return []
        return list(self._key_cache.get(labels, lambda: keys.granted_keys(self.database, labels)))

    def retire_key(self, name: str, version: int, now: datetime) -> RetiredKey:
        return keys.retire_key(self.database, name, version, now)

    def key_details(self, name: str, now: datetime) -> KeyDetails:
        return keys.key_details(self.database, name, now)

    def delete_key(self, name: str, now: datetime) -> DeletedKey:
        return keys.delete_key(self.database, name, now)

    def sealed_key_rows(self) -> list[SealedRow]:
        return keys.sealed_key_rows(self.database)

    def replace_sealed_key(self, row: SealedRow, new_blob: bytes) -> bool:
        return keys.replace_sealed_key(self.database, row, new_blob)

    def add_grant(self, key_name: str, selector: Mapping[str, str], now: datetime) -> Grant:
        return keys.add_grant(self.database, key_name, selector, now)

    def remove_grant(self, key_name: str, selector: Mapping[str, str], now: datetime) -> None:
        keys.remove_grant(self.database, key_name, selector, now)

    def list_grants(self) -> list[Grant]:
        return keys.list_grants(self.database)

    # --- policies (``kbs.store.policies``) ---------------------------------------------------

    def put_policy(
        self, name: str, document: Document, now: datetime,
        selectors: Sequence[Mapping[str, str]] | None = None,
        pushes: Mapping[str, StatePush] | None = None,
    ) -> tuple[Policy | None, Policy]:  # fmt: skip
        """Create or replace a policy's document (and, given ``selectors``, its assignments;
        given ``pushes``, the approved states and pushed approvals of a widening); returns
        (before, after)."""
        return policies.put_policy(self.database, name, document, now, selectors, pushes)

    def get_policy(self, name: str) -> Policy:
        return policies.get_policy(self.database, name)

    def assign_policy(self, name: str, selector: Mapping[str, str], now: datetime) -> Policy:
        return policies.assign_policy(self.database, name, selector, now)

    def unassign_policy(self, name: str, selector: Mapping[str, str], now: datetime) -> None:
        policies.unassign_policy(self.database, name, selector, now)

    def list_policies(self) -> list[Policy]:
        return policies.list_policies(self.database)

    def policies_for_labels(self, labels: Mapping[str, str]) -> list[Policy]:
        """Policies assigned to ``labels``, by name; cached per label set."""
        load = lambda: policies.policies_matching(self.database, labels)  # noqa: E731
        return list(self._policy_cache.get(labels, load))

    # --- audit and the change feed (``kbs.store.audit``, ``kbs.store.changes``) ----------------

    def audit(
        self, *, actor: str, event: str, node: str | None, result: str, detail: str,
        now: datetime,
    ) -> None:  # fmt: skip
        audit.add_audit(self.database, AuditEvent(actor, event, node, result, detail), now)

    def list_audit(self, node: str | None = None, limit: int = 100) -> list[AuditEntry]:
        return audit.list_audit(self.database, node, limit)

    def prune_audit(self, before: datetime) -> int:
        """Delete audit rows older than ``before``; returns how many."""
        return audit.prune_audit(self.database, before)

    def add_change(self, node: str | None, kind: ChangeKind, reason: str, now: datetime) -> int:
        return changes.add_change(self.database, node, kind, reason, now)

    def changes_since(
        self, last_id: int, limit: int = changes.MAX_CHANGES_PER_READ
    ) -> list[Change]:
        return changes.changes_since(self.database, last_id, limit)

    def last_change_id(self) -> int:
        return changes.last_change_id(self.database)

    # --- admin certificate revocations (``kbs.store.revocations``) -----------------------------

    def add_admin_revocations(
        self, rows: Sequence[AdminRevocation], audit_event: AuditEvent, now: datetime
    ) -> list[str]:
        return revocations.add_admin_revocations(self.database, rows, audit_event, now)

    def admin_revocation(self, serial: str) -> AdminRevocation | None:
        return revocations.admin_revocation(self.database, serial)

    def list_admin_revocations(self) -> list[AdminRevocation]:
        return revocations.list_admin_revocations(self.database)

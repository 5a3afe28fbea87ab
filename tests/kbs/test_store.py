"""The store on real databases, each test on SQLite and on PostgreSQL: single-use nonces and
challenges, the EK binding, selector matching, the change feed, concurrent use. Migrations and
SQLite file handling: tests/test_migrations.py; several brokers on one database: test_replicas."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from harness.postgres import PostgresServer, postgres_fixture  # noqa: F401
from kbs.errors import (
    ActivationFailed,
    NodeEkConflict,
    NonceExpired,
    NonceUnknown,
    NotFound,
    OperatorError,
)
from kbs.model import ChangeKind, KeyState, Node, NodeState, PendingEnrollment
from kbs.policy.rules import AllowedValue, Document, Rule, check_document
from kbs.store import AuditEvent, Store, audit
from kbs.store.cache import CHECK_INTERVAL, MAX_AGE, LabelCache
from kbs.store.enrollments import MAX_ENROLLMENTS_PER_NODE

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
EK_A, EK_B = "a" * 64, "b" * 64


def raw(pcrs: dict[int, bytes], bank: str = "sha256") -> Document:
    """A policy document of raw PCR values, one allowed value each."""
    return check_document(
        bank, [Rule(f"pcr.{i}", (AllowedValue(v.hex()),)) for i, v in pcrs.items()]
    )


def raw_values(store: Store, labels: dict[str, str]) -> dict[int, bytes]:
    policy = store.policies_for_labels(labels)[0]
    return {int(r.component[4:]): bytes.fromhex(r.allowed[0].value) for r in policy.rules}


@pytest.fixture(name="database", params=["sqlite", "postgresql"])
def database_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """A fresh database: a SQLite file path, or the URL of a new PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "kbs.db"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
def store(database: Path | str) -> Iterator[Store]:
    with Store.open(database) as s:
        yield s


def count_rows(store: Store, table: str) -> int:
    with store.database.tx(write=False, single=True) as db:
        query = sa.select(sa.func.count()).select_from(sa.table(table))
        return int(db.execute(query).scalar_one())


def enroll(
    store: Store,
    name: str,
    ek: str,
    *,
    ak: bytes = b"ak-1",
    state: NodeState = NodeState.PENDING,
    metadata: dict[str, str] | None = None,
) -> Node:
    return store.enroll_node(
        name=name,
        ek_hash=ek,
        ek_public=b"ek-public-" + ek.encode(),
        ek_certificate=b"ek-cert-" + ek.encode(),
        ak_public=ak,
        state=state,
        metadata=metadata or {},
        now=T0,
    )


def pending(enrollment_id: str, expires_at: datetime) -> PendingEnrollment:
    return PendingEnrollment(
        id=enrollment_id,
        node_name="n1",
        ek_public=b"ekpub",
        ek_certificate=b"ekcert",
        ak_public=b"akpub",
        ek_hash=EK_A,
        secret_sha256=b"\x07" * 32,
        metadata={"os": "debian"},
        expires_at=expires_at,
    )


# --- nonces and challenges --------------------------------------------------------------------


def test_nonce_is_single_use(store: Store) -> None:
    enroll(store, "n1", EK_A)
    enroll(store, "n2", EK_B)
    store.add_nonce("n1", b"N" * 32, T0 + timedelta(seconds=60))
    with pytest.raises(NonceUnknown, match="not issued to this node"):
        store.consume_nonce("n2", b"N" * 32, T0)  # another node's nonce
    store.consume_nonce("n1", b"N" * 32, T0 + timedelta(seconds=59))
    with pytest.raises(NonceUnknown, match="already used"):
        store.consume_nonce("n1", b"N" * 32, T0)


def test_expired_nonce_is_refused_and_used_up(store: Store) -> None:
    enroll(store, "n1", EK_A)
    store.add_nonce("n1", b"E" * 32, T0 + timedelta(seconds=60))
    with pytest.raises(NonceExpired, match=r"nonce expired at 2026-01-02T03:05:05.*get a new one"):
        store.consume_nonce("n1", b"E" * 32, T0 + timedelta(seconds=60))
    with pytest.raises(NonceUnknown):
        store.consume_nonce("n1", b"E" * 32, T0)


def test_old_nonces_are_purged_and_capped(store: Store) -> None:
    enroll(store, "n1", EK_A)
    store.add_nonce("n1", b"old", T0)
    for i in range(40):
        store.add_nonce("n1", bytes([i]) * 32, T0 + timedelta(seconds=100 + i))
    store.consume_nonce("n1", bytes([39]) * 32, T0)
    assert count_rows(store, "nonces") == 31
    with pytest.raises(NonceUnknown):  # the oldest went when the cap was reached
        store.consume_nonce("n1", b"old", T0)


def test_enrollment_challenge_is_single_use(store: Store) -> None:
    store.add_enrollment(pending("e1", T0 + timedelta(seconds=300)))
    taken = store.take_enrollment("e1", T0)
    assert taken == pending("e1", T0 + timedelta(seconds=300))
    with pytest.raises(ActivationFailed, match="unknown or already used enrollment"):
        store.take_enrollment("e1", T0)
    store.add_enrollment(pending("e2", T0))
    with pytest.raises(ActivationFailed, match="expired"):
        store.take_enrollment("e2", T0 + timedelta(seconds=1))
    with pytest.raises(ActivationFailed, match="already used"):
        store.take_enrollment("e2", T0)


def test_challenges_are_capped_per_node_name_and_ek(store: Store) -> None:
    """Challenges under the node's name with another EK (a stranger's own TPM) evict none of the
    node's: the newest MAX_ENROLLMENTS_PER_NODE are kept per name *and* EK."""
    store.add_enrollment(pending("real", T0 + timedelta(seconds=300)))
    for i in range(MAX_ENROLLMENTS_PER_NODE + 4):
        other = replace(pending(f"x{i}", T0 + timedelta(seconds=400 + i)), ek_hash=EK_B)
        store.add_enrollment(other)
    assert store.take_enrollment("real", T0).id == "real"
    with pytest.raises(ActivationFailed, match="unknown or already used"):
        store.take_enrollment("x0", T0)  # the stranger's oldest went when its own cap was hit
    assert store.take_enrollment(f"x{MAX_ENROLLMENTS_PER_NODE + 3}", T0).ek_hash == EK_B


# --- nodes ------------------------------------------------------------------------------------


def test_enroll_approve_revoke(store: Store) -> None:
    node = enroll(store, "n1", EK_A, metadata={"os": "debian"})
    assert node.state is NodeState.PENDING
    assert node.labels == {}
    assert node.metadata == {"os": "debian"}
    assert node.enrolled_at == T0
    assert node.last_attested_at is None
    approved = store.approve_node("n1", {"cluster": "prod"}, T0)
    assert approved.state is NodeState.APPROVED
    assert approved.labels == {"cluster": "prod"}
    assert store.revoke_node("n1", T0).state is NodeState.REVOKED
    assert store.node_by_ek(EK_A) == store.get_node("n1")
    assert store.node_by_ek(EK_B) is None
    with pytest.raises(NotFound):
        store.approve_node("nobody", {}, T0)
    with pytest.raises(NotFound):
        store.revoke_node("nobody", T0)


def test_reenrollment_with_the_same_ek_keeps_state_and_labels(store: Store) -> None:
    enroll(store, "n1", EK_A, ak=b"ak-1")
    store.approve_node("n1", {"cluster": "prod"}, T0)
    again = enroll(store, "n1", EK_A, ak=b"ak-2", state=NodeState.PENDING, metadata={"v": "2"})
    assert again.ak_public == b"ak-2"
    assert again.metadata == {"v": "2"}
    assert again.state is NodeState.APPROVED
    assert again.labels == {"cluster": "prod"}


def test_reenrollment_replaces_the_node_key_and_restarts_the_counters(store: Store) -> None:
    """Another enrollment of a known node stores its new node key, forgets the counters of the
    old AK's quotes and records a CHANGED row (replicas drop the old key they cached)."""
    store.enroll_node(
        name="n1", ek_hash=EK_A, ek_public=b"ek", ek_certificate=b"c", ak_public=b"ak-1",
        state=NodeState.APPROVED, metadata={}, now=T0, node_key=b"key-1",
    )  # fmt: skip
    store.record_attestation("n1", banks={"sha256": {}}, reset_count=5, restart_count=2, now=T0)
    last = store.last_change_id()
    store.enroll_node(
        name="n1", ek_hash=EK_A, ek_public=b"ek", ek_certificate=b"c", ak_public=b"ak-2",
        state=NodeState.PENDING, metadata={}, now=T0, node_key=b"key-2",
    )  # fmt: skip
    assert store.node_key("n1") == b"key-2"
    assert store.node_key("nobody") is None
    node = store.get_node("n1")
    assert node is not None
    assert (node.reset_count, node.restart_count, node.state) == (None, None, NodeState.APPROVED)
    assert [(c.node, c.kind) for c in store.changes_since(last)] == [("n1", ChangeKind.CHANGED)]


def test_ek_conflict_both_ways(store: Store) -> None:
    enroll(store, "n1", EK_A)
    with pytest.raises(NodeEkConflict, match="enrolled with another EK"):
        enroll(store, "n1", EK_B)
    with pytest.raises(NodeEkConflict, match="already enrolled as node 'n1'"):
        enroll(store, "n2", EK_A)
    assert store.get_node("n2") is None
    assert store.get_node("n1") is not None
    assert [n.name for n in store.list_nodes()] == ["n1"]


def test_record_attestation_round_trips_pcrs(store: Store) -> None:
    enroll(store, "n1", EK_A)
    pcrs = {7: b"\x07" * 32, 0: b"\x00" * 32, 10: bytes(range(32))}
    later = T0 + timedelta(minutes=5)
    banks = {"sha256": pcrs, "sha1": {7: b"\x01" * 20}}
    store.record_attestation(
        "n1", banks=banks, reset_count=3, restart_count=1, now=later, denial="PCR 7 differs"
    )
    node = store.get_node("n1")
    assert node is not None
    assert node.pcr_banks == banks
    assert (node.reset_count, node.restart_count, node.last_attested_at) == (3, 1, later)
    assert (node.last_denial, node.last_denial_at) == ("PCR 7 differs", later)
    with pytest.raises(NotFound):
        store.record_attestation("nobody", banks=banks, reset_count=0, restart_count=0, now=T0)


# --- keys, grants, policies -------------------------------------------------------------------


def test_keys_for_labels_matches_selectors(store: Store) -> None:
    store.add_key("zeta", "RSA-3072", b"z1", T0)
    store.add_key("alpha", "EC-P256", b"a1", T0)
    second = store.add_key("alpha", "EC-P256", b"a2", T0)
    assert second.version == 2
    store.add_key("ungranted", "EC-P256", b"u1", T0)
    store.add_grant("alpha", {"cluster": "prod", "region": "eu"}, T0)
    store.add_grant("zeta", {"region": "eu"}, T0)

    def names(labels: dict[str, str]) -> list[tuple[str, int, bytes]]:
        return [(k.name, k.version, k.encrypted_private) for k in store.keys_for_labels(labels)]

    assert names({"cluster": "prod", "region": "eu", "extra": "x"}) == [
        ("alpha", 1, b"a1"),  # every version not retired is released
        ("alpha", 2, b"a2"),
        ("zeta", 1, b"z1"),
    ]
    assert names({"region": "eu"}) == [("zeta", 1, b"z1")]
    assert names({"cluster": "prod", "region": "us"}) == []
    assert names({}) == []
    with pytest.raises(OperatorError, match="already granted"):
        store.add_grant("zeta", {"region": "eu"}, T0)
    with pytest.raises(NotFound, match="no key named 'nope'"):
        store.add_grant("nope", {"region": "eu"}, T0)
    with pytest.raises(OperatorError, match="non-empty selector"):
        store.add_grant("zeta", {}, T0)
    assert [(k.name, k.version) for k in store.list_keys()] == [
        ("alpha", 1),
        ("alpha", 2),
        ("ungranted", 1),
        ("zeta", 1),
    ]
    latest = store.get_key("alpha")
    assert latest is not None
    assert latest.encrypted_private == b"a2"
    assert store.get_key("nope") is None
    assert len(store.list_grants()) == 2


def test_every_version_not_retired_is_released_and_the_current_one_cannot_be_retired(
    store: Store,
) -> None:
    enroll(store, "n1", EK_A)
    store.approve_node("n1", {"cluster": "prod"}, T0)
    enroll(store, "n2", EK_B)
    store.approve_node("n2", {"cluster": "dev"}, T0)
    for n in (1, 2, 3):
        store.add_key("k", "EC-P256", f"k{n}".encode(), T0)
    store.add_grant("k", {"cluster": "prod"}, T0)
    released = store.keys_for_labels({"cluster": "prod"})
    assert [(k.version, k.state) for k in released] == [
        (1, KeyState.ACTIVE), (2, KeyState.ACTIVE), (3, KeyState.CURRENT)
    ]  # fmt: skip
    last = store.last_change_id()
    with pytest.raises(OperatorError, match=r"version 3 is key 'k'.s current .* rotate first"):
        store.retire_key("k", 3, T0)
    with pytest.raises(NotFound, match=r"key 'k' has no version 9 \(versions: 1, 2, 3\)"):
        store.retire_key("k", 9, T0)
    with pytest.raises(NotFound, match="no key named 'nope'"):
        store.retire_key("nope", 1, T0)
    assert store.changes_since(last) == []  # refused: nothing changed, nobody told

    later = T0 + timedelta(hours=1)
    retired = store.retire_key("k", 1, later)
    assert (retired.key.version, retired.key.state, retired.key.retired_at) == (
        1, KeyState.RETIRED, later
    )  # fmt: skip
    assert retired.nodes_notified == ("n1",)
    assert [(c.node, c.kind, c.reason) for c in store.changes_since(last)] == [
        ("n1", ChangeKind.CHANGED, "a key version was retired")
    ]
    with pytest.raises(OperatorError, match="already retired at 2026-01-02T04:04:05"):
        store.retire_key("k", 1, later)
    assert [k.version for k in store.keys_for_labels({"cluster": "prod"})] == [2, 3]
    assert [(k.version, k.state, k.retired_at) for k in store.list_keys()] == [
        (1, KeyState.RETIRED, later), (2, KeyState.ACTIVE, None), (3, KeyState.CURRENT, None)
    ]  # fmt: skip
    details = store.key_details("k", T0)
    assert details.versions == tuple(store.list_keys())
    assert details.grants == ({"cluster": "prod"},)


def test_key_details_name_the_nodes_holding_each_version(store: Store) -> None:
    """What each node's latest release gave it, while the lease lasts: replaced by the next
    release, cleared by a denial or a revocation, kept through a failure of the broker's own;
    a deleted key leaves nothing behind for a new key of the same name."""
    for name, ek in (("n1", EK_A), ("n2", EK_B), ("n3", "c" * 64)):
        enroll(store, name, ek)
        store.approve_node(name, {"cluster": "prod"}, T0)
    for name in ("k", "k_2", "other"):
        store.add_key(name, "EC-P256", b"c", T0)
        store.add_grant(name, {"cluster": "prod"}, T0)
    store.add_key("k", "EC-P256", b"c2", T0)
    until = T0 + timedelta(hours=1)

    def release(node: str, held: list[tuple[str, int]] | None, at: datetime = T0) -> None:
        store.record_attestation(node, banks={"sha256": {0: b"\0" * 32}}, reset_count=1,
                                 restart_count=0, now=at, held=held, lease_until=until)  # fmt: skip

    def holders(name: str = "k", now: datetime = T0) -> list[tuple[str, tuple[int, ...]]]:
        return [(h.node, h.versions) for h in store.key_details(name, now).holders]

    release("n1", [("k", 1), ("k", 2), ("other", 1)])
    release("n2", [("k", 2), ("k_2", 1)])
    release("n3", [("other", 1)])
    assert holders() == [("n1", (1, 2)), ("n2", (2,))]
    first = store.key_details("k", T0).holders[0]
    assert (first.released_at, first.lease_until) == (T0, until)
    assert holders("k_2") == [("n2", (1,))]  # "_" is no wildcard
    assert holders("other") == [("n1", (1,)), ("n3", (1,))]
    assert holders(now=until) == []  # the lease ended: the agents removed their keys

    release("n1", [("k", 2)], T0 + timedelta(minutes=1))  # v1 retired: the next release
    assert holders() == [("n1", (2,)), ("n2", (2,))]
    release("n1", None)  # the broker failed (not a denial): the agent keeps its keys
    assert holders() == [("n1", (2,)), ("n2", (2,))]
    release("n2", [])  # denied: the agent removed its keys
    assert holders() == [("n1", (2,))]
    store.revoke_node("n1", T0)
    assert holders() == []
    assert holders("other") == [("n3", (1,))]

    release("n2", [("k", 1), ("k", 2), ("k_2", 1)])
    store.delete_key("k", T0)
    store.add_key("k", "EC-P256", b"new", T0)
    assert holders() == []
    assert holders("k_2") == [("n2", (1,))]


def test_sealed_key_sees_its_own_version(store: Store) -> None:
    seen: list[int] = []

    def seal(version: int) -> bytes:
        seen.append(version)
        return f"sealed for v{version}".encode()

    store.add_sealed_key("k", "EC-P256", seal, T0)
    store.add_sealed_key("k", "EC-P256", seal, T0)
    key = store.get_key("k")
    assert seen == [1, 2]
    assert key is not None
    assert key.encrypted_private == b"sealed for v2"


def test_policies_for_labels(store: Store) -> None:
    _, boot = store.put_policy("boot", raw({0: b"\x00" * 32, 7: b"\x07" * 32}), T0)
    assert boot.selectors == ()
    store.put_policy("other", raw({4: b"\x04" * 32}), T0)
    store.assign_policy("boot", {"cluster": "prod"}, T0)
    store.assign_policy("boot", {"cluster": "dev"}, T0)
    store.assign_policy("other", {"cluster": "prod", "tier": "gpu"}, T0)
    assert [p.name for p in store.policies_for_labels({"cluster": "prod"})] == ["boot"]
    assert [p.name for p in store.policies_for_labels({"cluster": "prod", "tier": "gpu"})] == [
        "boot",
        "other",
    ]
    assert store.policies_for_labels({}) == []
    # Updating the values keeps the assignments.
    before, updated = store.put_policy("boot", raw({7: b"\x17" * 32}), T0)
    assert before is not None
    assert before.document == raw({0: b"\x00" * 32, 7: b"\x07" * 32})
    assert updated.document == raw({7: b"\x17" * 32})
    assert len(updated.selectors) == 2
    with pytest.raises(OperatorError, match="already assigned"):
        store.assign_policy("boot", {"cluster": "dev"}, T0)
    with pytest.raises(NotFound, match="no policy named"):
        store.assign_policy("nope", {"cluster": "dev"}, T0)
    with pytest.raises(OperatorError, match="empty policy means deny"):
        check_document("sha256", [])
    store.unassign_policy("boot", {"cluster": "dev"}, T0)
    assert [p.name for p in store.policies_for_labels({"cluster": "dev"})] == []
    with pytest.raises(NotFound, match="not assigned"):
        store.unassign_policy("boot", {"cluster": "dev"}, T0)


def test_allowlist(store: Store) -> None:
    assert not store.is_ek_allowed(EK_A)
    assert store.allow_ek(EK_A, T0) is True
    assert store.allow_ek(EK_A, T0) is False
    assert store.is_ek_allowed(EK_A)
    assert store.list_allowlist() == [(EK_A, T0)]


def test_audit_is_oldest_first_and_limited(store: Store) -> None:
    for i in range(5):
        store.audit(
            actor="node:n1",
            event="attest",
            node="n1" if i % 2 == 0 else "n2",
            result="ok",
            detail=f"#{i}",
            now=T0 + timedelta(seconds=i),
        )
    store.audit(actor="operator:root", event="key-import", node=None, result="ok", detail="k",
                now=T0)  # fmt: skip
    assert [e.detail for e in store.list_audit(node="n1")] == ["#0", "#2", "#4"]
    assert [e.detail for e in store.list_audit(limit=2)] == ["#4", "k"]
    assert store.list_audit(node="n2")[0].at == T0 + timedelta(seconds=1)


def test_audit_rows_before_the_cutoff_are_pruned_in_batches(store: Store) -> None:
    for day in range(12):
        store.audit(actor="node:n1", event="attest", node="n1", result="ok", detail=f"d{day}",
                    now=T0 + timedelta(days=day))  # fmt: skip
    assert audit.prune_audit(store.database, T0 + timedelta(days=7), batch=3) == 7
    assert [e.detail for e in store.list_audit()] == [f"d{d}" for d in range(7, 12)]
    assert store.prune_audit(T0 + timedelta(days=7)) == 0  # nothing left before the cutoff
    assert store.prune_audit(T0 + timedelta(days=30)) == 5
    assert store.list_audit() == []


# --- the change feed --------------------------------------------------------------------------


def test_changes_are_ordered_purged_after_a_day_and_ids_never_reused(store: Store) -> None:
    first = store.add_change("n1", ChangeKind.CHANGED, "labels", T0)
    second = store.add_change(None, ChangeKind.CHANGED, "everyone", T0 + timedelta(hours=1))
    assert second > first
    assert [(c.id, c.node, c.reason) for c in store.changes_since(0)] == [
        (first, "n1", "labels"),
        (second, None, "everyone"),
    ]
    assert store.changes_since(second) == []
    assert [c.id for c in store.changes_since(0, limit=1)] == [first]
    third = store.add_change("n2", ChangeKind.REVOKED, "revoked", T0 + timedelta(days=2))
    assert [c.id for c in store.changes_since(0)] == [third]  # the first two are purged
    assert store.changes_since(0)[0].at == T0 + timedelta(days=2)
    fourth = store.add_change("n2", ChangeKind.CHANGED, "x", T0 + timedelta(days=4))
    assert [c.id for c in store.changes_since(0)] == [fourth]
    assert store.last_change_id() == fourth > third


def test_a_refused_change_records_no_notification(store: Store) -> None:
    enroll(store, "n1", EK_A)
    store.approve_node("n1", {"cluster": "prod"}, T0)
    store.add_key("k", "EC-P256", b"c", T0)
    store.add_grant("k", {"cluster": "prod"}, T0)
    last = store.last_change_id()
    with pytest.raises(OperatorError, match="already granted"):
        store.add_grant("k", {"cluster": "prod"}, T0)
    with pytest.raises(NotFound, match="not granted"):
        store.remove_grant("k", {"cluster": "dev"}, T0)
    with pytest.raises(OperatorError, match="key rotate k"):
        store.add_sealed_key("k", "EC-P256", lambda v: b"c", T0, must_exist=False)
    with pytest.raises(NotFound, match="import it first"):
        store.add_sealed_key("new", "EC-P256", lambda v: b"c", T0, must_exist=True)
    assert store.changes_since(last) == []
    assert [k.version for k in store.list_keys()] == [1]


# --- the attestation path: one transaction, caches ----------------------------------------------


def test_record_attestation_writes_its_audit_rows_in_one_transaction(store: Store) -> None:
    enroll(store, "n1", EK_A)
    events = [AuditEvent("node:n1", "attest", "n1", "ok", "pcrs 0 match policy"),
              AuditEvent("node:n1", "release", "n1", "ok", "keys k@v1")]  # fmt: skip
    store.record_attestation("n1", banks={"sha256": {0: b"\x00" * 32}}, reset_count=1,
                             restart_count=0, now=T0, events=events)  # fmt: skip
    assert [(e.event, e.detail, e.at) for e in store.list_audit()] == [
        ("attest", "pcrs 0 match policy", T0), ("release", "keys k@v1", T0)
    ]  # fmt: skip
    with pytest.raises(NotFound):  # nothing of a failed call is kept
        store.record_attestation("nobody", banks={}, reset_count=0,
                                 restart_count=0, now=T0, events=events)  # fmt: skip
    assert len(store.list_audit()) == 2


def test_catalog_cache_follows_writes_of_this_and_other_processes(
    database: Path | str, store: Store
) -> None:
    approved = enroll(store, "n1", EK_A)
    store.approve_node(approved.name, {"cluster": "prod"}, T0)
    labels = {"cluster": "prod"}
    store.add_key("k", "EC-P256", b"k1", T0)
    store.add_grant("k", labels, T0)
    store.put_policy("boot", raw({0: b"\x00" * 32}), T0)
    store.assign_policy("boot", labels, T0)
    assert [k.name for k in store.keys_for_labels(labels)] == ["k"]
    assert [p.name for p in store.policies_for_labels(labels)] == ["boot"]
    # A write by this store object is seen at once.
    store.add_key("k", "EC-P256", b"k2", T0)
    assert [k.encrypted_private for k in store.keys_for_labels(labels)] == [b"k1", b"k2"]
    store.retire_key("k", 1, T0)
    assert [k.encrypted_private for k in store.keys_for_labels(labels)] == [b"k2"]
    # Another writer (the operator CLI, another replica): seen within CHECK_INTERVAL.
    with Store.open(database) as other:
        other.remove_grant("k", labels, T0)
        other.put_policy("boot", raw({7: b"\x07" * 32}), T0)
    deadline = time.monotonic() + CHECK_INTERVAL + 0.5
    while store.keys_for_labels(labels) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.keys_for_labels(labels) == []
    assert raw_values(store, labels) == {7: b"\x07" * 32}


def test_label_cache_bounds_the_age_of_what_it_serves() -> None:
    clock = [0.0]
    change_id = [1]
    loads: list[int] = []
    cache: LabelCache[int] = LabelCache(lambda: change_id[0], clock=lambda: clock[0])

    def load() -> int:
        loads.append(1)
        return len(loads)

    assert cache.get({"a": "b"}, load) == 1
    assert cache.get({"a": "b"}, load) == 1  # cached
    change_id[0] = 2  # another process changed something: noticed after CHECK_INTERVAL
    clock[0] = CHECK_INTERVAL / 2
    assert cache.get({"a": "b"}, load) == 1
    clock[0] = CHECK_INTERVAL * 1.5
    assert cache.get({"a": "b"}, load) == 2
    clock[0] += MAX_AGE  # a write that recorded no change: the entry expires anyway
    assert cache.get({"a": "b"}, load) == 3
    cache.clear()
    assert cache.get({"a": "b"}, load) == 4

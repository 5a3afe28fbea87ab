"""Conversions between the admin API's messages (``admin.proto``) and the domain values, in both
directions; used by ``kbs.admin.service`` (broker) and ``kbs.admin.client`` (operator).

Listings leave out what no operator output shows (EK/AK public areas, certificates, ciphertext).
Times travel as microseconds since the epoch, UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from kbs.errors import InvalidRequest
from kbs.model import (
    AuditEntry,
    BootRecord,
    Grant,
    KeyDetails,
    KeyHolder,
    KeyState,
    Node,
    NodeState,
    Policy,
    StoredKey,
)
from kbs.policy.learn import DiffRow
from kbs.policy.rules import AllowedValue, Document, Rule
from keylease.api.v1 import admin_pb2 as pb
from keylease.eventlog.bootstate import BootState, Component

__all__ = [
    "audit_from_pb",
    "audit_to_pb",
    "boot_from_pb",
    "boot_to_pb",
    "diff_from_pb",
    "diff_to_pb",
    "from_us",
    "grant_from_pb",
    "grant_to_pb",
    "key_details_from_pb",
    "key_details_to_pb",
    "key_from_pb",
    "key_to_pb",
    "node_from_pb",
    "node_to_pb",
    "policy_from_pb",
    "policy_to_pb",
    "to_us",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(when: datetime) -> int:
    delta = when - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    try:
        return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)
    except (OverflowError, OSError, ValueError):
        raise InvalidRequest(f"timestamp {us} is out of range") from None


def _pcrs(pcrs: Mapping[int, bytes]) -> dict[int, bytes]:
    return {int(i): bytes(v) for i, v in pcrs.items()}


def node_to_pb(node: Node) -> pb.AdminNode:
    msg = pb.AdminNode(
        name=node.name,
        state=node.state.value,
        labels=dict(node.labels),
        ek_hash=node.ek_hash,
        metadata=dict(node.metadata),
        enrolled_at_us=to_us(node.enrolled_at),
        pcr_banks=[pb.AdminPcrBank(bank=b, pcrs=_pcrs(v)) for b, v in node.pcr_banks.items()],
    )
    if node.last_attested_at is not None:
        msg.last_attested_at_us = to_us(node.last_attested_at)
    if node.boot_log_digest is not None:
        msg.boot_log_digest = node.boot_log_digest
    if node.last_denial is not None:
        msg.last_denial = node.last_denial
    if node.last_denial_at is not None:
        msg.last_denial_at_us = to_us(node.last_denial_at)
    if node.reset_count is not None:
        msg.reset_count = node.reset_count
    if node.restart_count is not None:
        msg.restart_count = node.restart_count
    return msg


def node_from_pb(msg: pb.AdminNode) -> Node:
    try:
        state = NodeState(msg.state)
    except ValueError:
        raise InvalidRequest(f"unknown node state {msg.state!r}") from None
    return Node(
        name=msg.name,
        state=state,
        labels=dict(msg.labels),
        ek_hash=msg.ek_hash,
        ek_public=b"",
        ek_certificate=b"",
        ak_public=b"",
        metadata=dict(msg.metadata),
        enrolled_at=from_us(msg.enrolled_at_us),
        last_attested_at=(
            from_us(msg.last_attested_at_us) if msg.HasField("last_attested_at_us") else None
        ),
        pcr_banks={b.bank: _pcrs(b.pcrs) for b in msg.pcr_banks},
        reset_count=msg.reset_count if msg.HasField("reset_count") else None,
        restart_count=msg.restart_count if msg.HasField("restart_count") else None,
        boot_log_digest=msg.boot_log_digest if msg.HasField("boot_log_digest") else None,
        last_denial=msg.last_denial if msg.HasField("last_denial") else None,
        last_denial_at=(
            from_us(msg.last_denial_at_us) if msg.HasField("last_denial_at_us") else None
        ),
    )


def boot_to_pb(boot: BootRecord | None) -> pb.AdminBootRecord:
    if boot is None:
        return pb.AdminBootRecord(present=False)
    return pb.AdminBootRecord(
        present=True,
        log_digest=boot.log_digest,
        recorded_at_us=to_us(boot.recorded_at),
        states=[
            pb.AdminBootState(
                bank=s.bank,
                touched=list(s.touched),
                components=[
                    pb.AdminBootComponent(
                        name=c.name,
                        pcrs=list(c.pcrs),
                        value=c.value,
                        summary=c.summary,
                        entries=list(c.entries),
                    )
                    for c in s.components
                ],
            )
            for s in boot.states.values()
        ],
    )


def boot_from_pb(msg: pb.AdminBootRecord) -> BootRecord | None:
    if not msg.present:
        return None
    states = {
        s.bank: BootState(
            s.bank,
            tuple(
                Component(c.name, tuple(c.pcrs), c.value, c.summary, tuple(c.entries))
                for c in s.components
            ),
            tuple(s.touched),
        )
        for s in msg.states
    }
    return BootRecord(msg.log_digest, states, from_us(msg.recorded_at_us))


def diff_to_pb(rows: list[DiffRow]) -> pb.AdminPolicyDiff:
    return pb.AdminPolicyDiff(
        rows=[
            pb.AdminDiffRow(
                component=r.component,
                pcrs=list(r.pcrs),
                node_value=r.node_value,
                node_summary=r.node_summary,
                result=r.result,
                allowed=r.allowed,
            )
            for r in rows
        ]
    )


def diff_from_pb(msg: pb.AdminPolicyDiff) -> list[DiffRow]:
    return [
        DiffRow(r.component, tuple(r.pcrs), r.node_value, r.node_summary, r.result, r.allowed)
        for r in msg.rows
    ]


def key_to_pb(key: StoredKey) -> pb.AdminKey:
    msg = pb.AdminKey(
        name=key.name,
        version=key.version,
        algorithm=key.algorithm,
        created_at_us=to_us(key.created_at),
        state=key.state.value,
    )
    if key.retired_at is not None:
        msg.retired_at_us = to_us(key.retired_at)
    return msg


def key_from_pb(msg: pb.AdminKey) -> StoredKey:
    try:
        state = KeyState(msg.state)
    except ValueError:
        raise InvalidRequest(f"unknown key state {msg.state[:40]!r}") from None
    retired_at = from_us(msg.retired_at_us) if msg.HasField("retired_at_us") else None
    created_at = from_us(msg.created_at_us)
    return StoredKey(msg.name, msg.version, msg.algorithm, b"", created_at, state, retired_at)


def key_details_to_pb(details: KeyDetails) -> pb.AdminKeyDetails:
    return pb.AdminKeyDetails(
        name=details.name,
        versions=[key_to_pb(k) for k in details.versions],
        grants=[pb.AdminSelector(pairs=dict(s)) for s in details.grants],
        holders=[
            pb.AdminKeyHolder(
                node=h.node,
                versions=h.versions,
                released_at_us=to_us(h.released_at),
                lease_until_us=to_us(h.lease_until),
            )
            for h in details.holders
        ],
    )


def key_details_from_pb(msg: pb.AdminKeyDetails) -> KeyDetails:
    return KeyDetails(
        name=msg.name,
        versions=tuple(key_from_pb(k) for k in msg.versions),
        grants=tuple(dict(s.pairs) for s in msg.grants),
        holders=tuple(
            KeyHolder(h.node, tuple(h.versions), from_us(h.released_at_us),
                      from_us(h.lease_until_us))
            for h in msg.holders
        ),
    )  # fmt: skip


def grant_to_pb(grant: Grant) -> pb.AdminGrant:
    return pb.AdminGrant(
        key=grant.key_name, selector=dict(grant.selector), created_at_us=to_us(grant.created_at)
    )


def grant_from_pb(msg: pb.AdminGrant) -> Grant:
    return Grant(msg.key, dict(msg.selector), from_us(msg.created_at_us))


def policy_to_pb(policy: Policy) -> pb.AdminPolicy:
    return pb.AdminPolicy(
        name=policy.name,
        pcr_bank=policy.pcr_bank,
        selectors=[pb.AdminSelector(pairs=dict(s)) for s in policy.selectors],
        rules=[
            pb.AdminPolicyRule(
                component=r.component,
                allowed=[pb.AdminAllowedValue(value=a.value, note=a.note) for a in r.allowed],
                contains=list(r.contains),
            )
            for r in policy.rules
        ],
    )


def policy_from_pb(msg: pb.AdminPolicy) -> Policy:
    """A policy the broker sent (it validated it; shown as it is)."""
    rules = tuple(
        Rule(
            r.component,
            tuple(AllowedValue(a.value, a.note) for a in r.allowed),
            tuple(r.contains),
        )
        for r in msg.rules
    )
    return Policy(
        name=msg.name,
        document=Document(msg.pcr_bank, rules),
        selectors=tuple(dict(s.pairs) for s in msg.selectors),
    )


def audit_to_pb(entry: AuditEntry) -> pb.AdminAuditEntry:
    msg = pb.AdminAuditEntry(
        id=entry.id,
        at_us=to_us(entry.at),
        actor=entry.actor,
        event=entry.event,
        result=entry.result,
        detail=entry.detail,
    )
    if entry.node is not None:
        msg.node = entry.node
    return msg


def audit_from_pb(msg: pb.AdminAuditEntry) -> AuditEntry:
    return AuditEntry(
        id=msg.id,
        at=from_us(msg.at_us),
        actor=msg.actor,
        event=msg.event,
        node=msg.node if msg.HasField("node") else None,
        result=msg.result,
        detail=msg.detail,
    )

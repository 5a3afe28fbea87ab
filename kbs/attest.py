"""Attestation (DESIGN.md step 2) and the release decision (step 3).

Fixed order: node known -> nonce consumed (single use, even if what follows fails; issued by
``kbs.nonces``) -> quote verified with the enrolled AK (``kbs.quote``) -> event log parsed and
replayed against the quoted banks (``kbs.eventlog``) -> reset/restart counters not behind the last
verified quote's -> PCRs and boot state recorded -> node state -> policy (``kbs.policy.evaluate``)
-> grants -> approvals (``kbs.approvals.release``) -> release (``kbs.release``). Anything that
fails raises a specific error; a denial after a verified quote is recorded on the node (``node
show``) with the text the node is told.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from kbs.approvals.release import ReleaseApprovals, release_approvals
from kbs.context import BrokerContext
from kbs.errors import (
    AttestationFailed,
    CounterRollback,
    InvalidRequest,
    KbsError,
    NodeRevoked,
    NotGranted,
    PolicyDenied,
    UnknownNode,
)
from kbs.eventlog import VerifiedLog, verify_event_log
from kbs.masterkey import key_aad
from kbs.model import Node, NodeState, Policy, check_node_name
from kbs.policy.evaluate import Sealing, evaluate, sealed_pcrs
from kbs.quote import VerifiedQuote, verify_quote
from kbs.release import GrantedKey, SealedRelease, build_release
from kbs.store import AuditEvent, BootUpdate
from kbs.tpm.objects import TpmPublic, parse_public
from keylease.api.v1 import NONCE_BYTES, qualifying_data

__all__ = ["AttestOutcome", "AttestResult", "Evidence", "attest"]

log = logging.getLogger(__name__)

PENDING_DETAIL = "quote verified; node awaits operator approval"


class AttestOutcome(Enum):
    PENDING_APPROVAL = "pending"
    RELEASED = "released"


@dataclass(frozen=True)
class Evidence:
    node_name: str
    nonce: bytes
    quote: bytes
    signature: bytes
    banks: Mapping[str, Mapping[int, bytes]]  # bank -> PCR index -> value, as sent
    event_log: bytes


@dataclass(frozen=True)
class AttestResult:
    outcome: AttestOutcome
    release: SealedRelease | None


def _known_node(ctx: BrokerContext, name: str) -> Node:
    check_node_name(name)
    node = ctx.store.get_node(name)
    if node is None:
        raise UnknownNode.not_enrolled(name)
    return node


def _check_shape(ev: Evidence) -> None:
    if len(ev.nonce) != NONCE_BYTES:
        raise InvalidRequest(f"nonce must be {NONCE_BYTES} bytes, got {len(ev.nonce)}")


def _required(policies: Sequence[Policy]) -> dict[str, set[int]]:
    """The PCRs the quote must cover for these policies (none when there are none, or when they
    cannot be combined: ``evaluate`` says so once the quote is verified and recorded)."""
    if not policies:
        return {}
    try:
        bank, pcrs = sealed_pcrs(policies)
    except PolicyDenied:
        return {}
    return {bank: set(pcrs)}


def _boot_update(node: Node, log: VerifiedLog | None) -> BootUpdate | None:
    """What to record of the event log: nothing when it is the one already recorded."""
    digest = log.digest if log is not None else None
    if digest == node.boot_log_digest:
        return None
    return BootUpdate(digest, log.states if log is not None else {})


def attest(ctx: BrokerContext, ev: Evidence) -> AttestResult:
    node = _known_node(ctx, ev.node_name)
    _check_shape(ev)
    now = ctx.clock()
    ctx.store.consume_nonce(node.name, ev.nonce, now)
    if node.state is NodeState.REVOKED:
        raise NodeRevoked(f"node {node.name!r} was revoked by an operator")
    policies = (
        ctx.store.policies_for_labels(node.labels) if node.state is NodeState.APPROVED else []
    )
    ak = parse_public(node.ak_public, "enrolled AK")
    ek = parse_public(node.ek_public, "enrolled EK")
    quote = verify_quote(
        ak,
        ev.quote,
        ev.signature,
        qualifying_data(ev.nonce),
        ev.banks,
        required=_required(policies),
        ek=ek,
    )
    boot_log = verify_event_log(ctx.event_logs, ev.event_log, quote.banks) if ev.event_log else None
    _check_counters(node, quote)
    record = functools.partial(
        ctx.store.record_attestation,
        node.name,
        banks=quote.banks,
        reset_count=quote.reset_count,
        restart_count=quote.restart_count,
        now=now,
        boot=_boot_update(node, boot_log),
    )
    actor = f"node:{node.name}"
    if node.state is NodeState.PENDING:
        record(events=[AuditEvent(actor, "attest", node.name, "pending", PENDING_DETAIL)])
        log.info("attest node=%s result=pending", node.name)
        return AttestResult(AttestOutcome.PENDING_APPROVAL, None)
    try:
        sealing, approvals, release = _release(ctx, node, ek, quote, boot_log, policies, now)
    except KbsError as exc:
        # Refused after a verified quote: its PCRs and boot state are kept (`policy learn`,
        # `policy allow --from-node`), and the denial is shown by `node show`. A denial makes
        # the agent remove its keys; a failure of the broker's own does not.
        denied = isinstance(exc, AttestationFailed)
        record(held=() if denied else None, denial=str(exc) if denied else None)
        raise
    names = ",".join(f"{n}@v{v}" for n, v in release.keys)
    matched = ",".join(p.name for p in policies)
    record(
        events=[
            AuditEvent(
                actor, "attest", node.name, "ok",
                f"boot allowed by policy {matched} ({sealing.bank} PCRs "
                f"{','.join(str(i) for i in sorted(sealing.pcrs))})",
            ),
            AuditEvent(
                actor, "release", node.name, "ok",
                f"keys {names} until {release.not_after.isoformat()}",
            ),
        ],
        held=release.keys,
        lease_until=release.not_after,
        binding=approvals.binding,
        states=approvals.states,
    )  # fmt: skip
    log.info(
        "attest node=%s result=released keys=%s approvals=%d",
        node.name, names, len(release.approvals),
    )  # fmt: skip
    return AttestResult(AttestOutcome.RELEASED, release)


def _check_counters(node: Node, quote: VerifiedQuote) -> None:
    """The TPM's (resetCount, restartCount) never go back for one AK: if they did, the TPM's
    state was restored from an older copy (a replayed quote is stopped by the nonce already)."""
    if node.reset_count is None or node.restart_count is None:
        return
    last = (node.reset_count, node.restart_count)
    if (quote.reset_count, quote.restart_count) < last:
        raise CounterRollback(
            f"the TPM's reset/restart counters went back from {last[0]}/{last[1]} to "
            f"{quote.reset_count}/{quote.restart_count}: its state was rolled back (restored "
            "from a copy or a snapshot); if that was intended, the node must enroll again"
        )


def _release(
    ctx: BrokerContext,
    node: Node,
    ek: TpmPublic,
    quote: VerifiedQuote,
    boot_log: VerifiedLog | None,
    policies: Sequence[Policy],
    now: datetime,
) -> tuple[Sealing, ReleaseApprovals, SealedRelease]:
    """The policy decision, the approvals and the sealed release for an approved node's
    verified evidence."""
    states = boot_log.states if boot_log is not None else None
    sealing = evaluate(policies, quote.banks, states)
    stored = ctx.store.keys_for_labels(node.labels)
    if not stored:
        labels = ",".join(f"{k}={v}" for k, v in sorted(node.labels.items())) or "none"
        raise NotGranted(
            f"no key is granted to node {node.name!r} (labels: {labels}); an operator can run "
            "`keylease-kbs grant add KEY --selector k=v`"
        )
    granted = [
        GrantedKey(
            name=k.name,
            version=k.version,
            private_pem=ctx.master_key.open(k.encrypted_private, key_aad(k.name, k.version)),
        )
        for k in stored
    ]
    state = states.get(sealing.bank) if states is not None else None
    approvals = release_approvals(ctx, node, policies, sealing, state, quote.clock, now)
    release = build_release(
        node_name=node.name,
        ek=ek,
        auth_policy=approvals.auth_policy,
        policy_group=approvals.group,
        pcr_bank=sealing.bank,
        pcr_indices=tuple(sorted(sealing.pcrs)),
        approvals=approvals.approvals,
        keys=granted,
        issued_at=now,
        not_after=now + timedelta(seconds=ctx.config.lease_seconds),
        lease_clock_limit=quote.clock + ctx.config.lease_seconds * 1000,
        signer=ctx.signer,
    )
    return sealing, approvals, release

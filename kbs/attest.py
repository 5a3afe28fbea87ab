"""Attestation (DESIGN.md step 2) and the release decision (step 3).

Fixed order: node known -> nonce consumed (single use, even if what follows fails; issued by
``kbs.nonces``) -> quote verified with the enrolled AK (``kbs.quote``) -> event log replayed
(``kbs.eventlog``) -> reset/restart counters not behind the last verified quote's -> PCRs
recorded -> node state -> policy (``kbs.policy``) -> grants ->
release (``kbs.release``). Anything that fails raises a specific ``AttestationFailed``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from kbs.context import BrokerContext
from kbs.errors import (
    CounterRollback,
    InvalidRequest,
    KbsError,
    NodeRevoked,
    NotGranted,
    UnknownNode,
)
from kbs.eventlog import check_event_log
from kbs.masterkey import key_aad
from kbs.model import Node, NodeState, Policy, check_node_name
from kbs.policy import evaluate, required_pcrs
from kbs.quote import VerifiedQuote, verify_quote
from kbs.release import GrantedKey, SealedRelease, build_release
from kbs.store import AuditEvent
from kbs.tpm.objects import TpmPublic, parse_public
from keylease.api.v1 import NONCE_BYTES, qualifying_data

__all__ = ["AttestOutcome", "AttestResult", "Evidence", "attest"]

log = logging.getLogger(__name__)

SUPPORTED_BANKS = frozenset({"sha256"})
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
    pcr_bank: str
    pcrs: Mapping[int, bytes]
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
    if ev.pcr_bank not in SUPPORTED_BANKS:
        raise InvalidRequest(f"unsupported PCR bank {ev.pcr_bank[:32]!r}; use sha256")


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
        ev.pcr_bank,
        ev.pcrs,
        required=set(required_pcrs(policies)),
        ek=ek,
    )
    if ev.event_log:
        check_event_log(ev.event_log, quote.pcr_bank, quote.pcrs)
    _check_counters(node, quote)
    record = functools.partial(
        ctx.store.record_attestation,
        node.name,
        bank=quote.pcr_bank,
        pcrs=quote.pcrs,
        reset_count=quote.reset_count,
        restart_count=quote.restart_count,
        now=now,
    )
    actor = f"node:{node.name}"
    if node.state is NodeState.PENDING:
        record(events=[AuditEvent(actor, "attest", node.name, "pending", PENDING_DETAIL)])
        log.info("attest node=%s result=pending", node.name)
        return AttestResult(AttestOutcome.PENDING_APPROVAL, None)
    try:
        sealed_pcrs, release = _release(ctx, node, ek, quote, policies, now)
    except KbsError:
        record()  # refused after a verified quote: its PCRs are kept (`policy set --from-node`)
        raise
    names = ",".join(f"{n}@v{v}" for n, v in release.keys)
    record(
        events=[
            AuditEvent(
                actor, "attest", node.name, "ok",
                f"pcrs {','.join(str(i) for i in sorted(sealed_pcrs))} match policy",
            ),
            AuditEvent(
                actor, "release", node.name, "ok",
                f"keys {names} until {release.not_after.isoformat()}",
            ),
        ]
    )  # fmt: skip
    log.info("attest node=%s result=released keys=%s", node.name, names)
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
    policies: Sequence[Policy],
    now: datetime,
) -> tuple[Mapping[int, bytes], SealedRelease]:
    """The policy decision and the sealed release for an approved node's verified quote."""
    sealed_pcrs = evaluate(policies, quote.pcr_bank, quote.pcrs)
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
    release = build_release(
        node_name=node.name,
        ek=ek,
        pcr_bank=quote.pcr_bank,
        pcrs=sealed_pcrs,
        keys=granted,
        issued_at=now,
        not_after=now + timedelta(seconds=ctx.config.lease_seconds),
        signer=ctx.signer,
    )
    return sealed_pcrs, release

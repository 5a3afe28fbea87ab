"""One attestation round (DESIGN.md steps 2-4): quote, receive a release, open it, install.

Enrolls first when needed (``agent.enroll``), and again when the broker does not accept the
node's credentials (UNAUTHENTICATED: it does not know this node's key). Only a verified denial
(``AttestationDenied``: the broker authenticated this node and refused it) removes the keys this
agent installed, and the cached release. A refusal without a verdict (a nonce unknown or
expired, a quote the broker could not verify) is retried once at once with a new nonce, then
reported (``AttestationRefused``); the keys stay. On success the release, checked against the
broker's signature, is opened under its approval for the state just quoted, installed, and
becomes the new cache; its approvals are kept (``agent.keystore.approvals``) for restores. A
cache that cannot be written (state directory full or read-only) does not undo the attestation:
the keys are installed under a valid lease; a warning says that a restart would restore the
previous release (or none) and attest again, and the next renewal writes the cache again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.approvals import accepted, open_approved
from agent.blobs import NodeIdentity
from agent.bootlog import read_event_log
from agent.broker import AttestReply, BrokerClient, Outcome
from agent.config import AgentConfig
from agent.enroll import Enrolled, NodeCredentials, enroll, enrolled
from agent.errors import (
    AttestationDenied,
    AttestationRefused,
    NotAuthenticated,
    PendingApproval,
    StateError,
)
from agent.keystore import ApprovalStore, SealedCache, install_keys, remove_all_keys
from agent.release import Bundle
from agent.signature import ReleaseTrust
from agent.state import StateDir
from agent.tpm import Quote, Tpm
from keylease.api.v1 import qualifying_data
from keylease.api.v1.approvals import Approval

__all__ = ["AttestReport", "attest_once"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttestReport:
    node_name: str
    bundle: Bundle
    installed: tuple[str, ...]
    removed: tuple[str, ...]
    identity: NodeIdentity
    clock: int  # the TPM clock at the quote (ms)
    approvals: int  # approvals held now


def attest_once(
    cfg: AgentConfig,
    tpm: Tpm,
    client: BrokerClient,
    state: StateDir,
    credentials: NodeCredentials | None = None,
) -> AttestReport:
    """Attest and install the released keys; raise a specific AgentError otherwise.
    ``credentials``: the node identity recovered so far, updated when it changes."""
    credentials = credentials or NodeCredentials()
    trust = ReleaseTrust.load(cfg.kbs_ca)
    node = enrolled(cfg, tpm, client, state, credentials.get())
    credentials.set(node.identity)
    try:
        reply, quote = _attest(cfg, tpm, client, state, node)
    except NotAuthenticated as exc:
        log.info("attest node=%s: %s", cfg.node_name, exc)
        credentials.set(None)
        state.forget_enrollment()
        node = enroll(cfg, tpm, client, state)
        credentials.set(node.identity)
        reply, quote = _attest(cfg, tpm, client, state, node)
    if reply.outcome is Outcome.PENDING_APPROVAL or reply.release is None:
        log.info("attest node=%s result=pending", cfg.node_name)
        raise PendingApproval(
            f"node {cfg.node_name} is enrolled and attested, pending operator approval: "
            f"keylease-kbs node approve {cfg.node_name} --label k=v"
        )
    release = reply.release
    store = ApprovalStore(state)
    fresh = accepted(release.approvals, trust, cfg.node_name)
    held: tuple[Approval, ...] = (*store.load(), *fresh)
    opened = open_approved(
        tpm, release, cfg.node_name, trust, held, lambda: read_event_log(cfg.event_log),
        pcrs=quote.banks, clock=quote.clock,
    )  # fmt: skip
    bundle = opened.bundle
    installed, removed = install_keys(cfg, bundle.keys)
    try:
        held = store.merge(fresh, quote.clock)
        SealedCache(state).save(
            release, quote.banks.get(release.sealed.pcr_bank, {}), bundle.lease_clock_limit
        )
    except StateError as exc:
        log.warning(
            "attest node=%s: the sealed cache was not updated (%s); the keys are installed, a "
            "restart before the next renewal restores the previous release",
            cfg.node_name,
            exc,
        )
    log.info(
        "attest node=%s result=ok keys=%s until=%s approvals=%d",
        cfg.node_name,
        bundle.describe(),
        bundle.not_after.isoformat(),
        len(held),
    )
    return AttestReport(
        cfg.node_name, bundle, installed, removed, node.identity, quote.clock, len(held)
    )


def _attest(
    cfg: AgentConfig, tpm: Tpm, client: BrokerClient, state: StateDir, node: Enrolled
) -> tuple[AttestReply, Quote]:
    """GetNonce, quote, Attest; once more with a new nonce after a refusal without a verdict."""
    event_log = read_event_log(cfg.event_log)
    for attempt in (1, 2):
        nonce = client.get_nonce(node.identity)
        quote = tpm.quote(node.ak, qualifying_data(nonce))
        try:
            return client.attest(node.identity, nonce, quote, event_log), quote
        except AttestationRefused as exc:
            if attempt == 2:
                raise
            log.info("attest node=%s refused (%s); once more with a new nonce", cfg.node_name, exc)
        except AttestationDenied as exc:
            dropped = remove_all_keys(cfg, SealedCache(state))
            log.info("attest node=%s result=denied reason=%s", cfg.node_name, exc)
            raise AttestationDenied(_denial_text(str(exc), dropped)) from None
    raise AssertionError("unreachable: the second attempt returns or raises")


def _denial_text(reason: str, removed: tuple[str, ...]) -> str:
    text = f"attestation denied: {reason}"
    if removed:
        text += f"; removed {len(removed)} key file(s): {', '.join(removed)}"
    return text

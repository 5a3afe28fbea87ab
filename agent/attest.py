"""One attestation round (DESIGN.md steps 2-4): quote, receive a release, open it, install.

Enrolls first when needed (``agent.enroll``). On a denial the keys this agent installed are
removed at once, and the cached release dropped; on success the release becomes the new cache.
A cache that cannot be written (state directory full or read-only) does not undo the attestation:
the keys are installed under a valid lease; a warning says that a restart would restore the
previous release (or none) and attest again, and the next renewal writes the cache again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.broker import BrokerClient, Outcome
from agent.config import AgentConfig
from agent.enroll import enroll, enrolled_ak
from agent.errors import AttestationDenied, NodeUnknown, PendingApproval, StateError
from agent.keystore import SealedCache, install_keys, remove_all_keys
from agent.release import Bundle, open_release
from agent.state import StateDir
from agent.tpm import Tpm
from keylease.api.v1 import qualifying_data
from keylease.api.v1.limits import MAX_EVENT_LOG

__all__ = ["AttestReport", "attest_once"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttestReport:
    node_name: str
    bundle: Bundle
    installed: tuple[str, ...]
    removed: tuple[str, ...]


def attest_once(cfg: AgentConfig, tpm: Tpm, client: BrokerClient, state: StateDir) -> AttestReport:
    """Attest and install the released keys; raise a specific AgentError otherwise."""
    cache = SealedCache(state)
    ak = enrolled_ak(cfg, tpm, client, state)
    try:
        nonce = client.get_nonce(cfg.node_name)
    except NodeUnknown:
        log.info("broker does not know node=%s; enrolling again", cfg.node_name)
        state.forget_enrollment()
        ak = enroll(cfg, tpm, client, state)
        nonce = client.get_nonce(cfg.node_name)
    quote = tpm.quote(ak, qualifying_data(nonce))
    event_log = _read_event_log(cfg.event_log)
    try:
        reply = client.attest(cfg.node_name, nonce, quote, event_log)
    except AttestationDenied as exc:
        dropped = remove_all_keys(cfg, cache)
        log.info("attest node=%s result=denied reason=%s", cfg.node_name, exc)
        raise AttestationDenied(_denial_text(str(exc), dropped)) from None
    if reply.outcome is Outcome.PENDING_APPROVAL or reply.release is None:
        log.info("attest node=%s result=pending", cfg.node_name)
        raise PendingApproval(
            f"node {cfg.node_name} is enrolled and attested, pending operator approval: "
            f"keylease-kbs node approve {cfg.node_name} --label k=v"
        )
    bundle = open_release(tpm, reply.release, cfg.node_name)
    installed, removed = install_keys(cfg, bundle.keys)
    try:
        cache.save(reply.release, quote.pcrs)
    except StateError as exc:
        log.warning(
            "attest node=%s: the sealed cache was not updated (%s); the keys are installed, a "
            "restart before the next renewal restores the previous release",
            cfg.node_name,
            exc,
        )
    log.info(
        "attest node=%s result=ok keys=%s until=%s",
        cfg.node_name,
        bundle.describe(),
        bundle.not_after.isoformat(),
    )
    return AttestReport(cfg.node_name, bundle, installed, removed)


def _read_event_log(path: Path | None) -> bytes:
    if path is None:
        return b""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_EVENT_LOG + 1)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise StateError(f"cannot read the boot event log {path}: {exc.strerror}") from None
    if len(data) > MAX_EVENT_LOG:
        raise StateError(f"boot event log {path} is larger than {MAX_EVENT_LOG} bytes")
    return data


def _denial_text(reason: str, removed: tuple[str, ...]) -> str:
    text = f"attestation denied: {reason}"
    if removed:
        text += f"; removed {len(removed)} key file(s): {', '.join(removed)}"
    return text

"""The broker's approvals on this node: which boot states open the sealed releases, until when.

A release from the broker is bound (PolicyAuthorize) to the broker's signing key for this node
and its policy group, and opens only under an approval for the PCR values the TPM holds, while
the TPM clock is below the approval's limit. Approvals arrive with each release and on the watch
stream when a policy widens; the agent keeps them (``agent.keystore.approvals``) after checking
they are the broker's (``accept``), and at each opening — a fresh release, or the sealed cache at
start, offline — picks the one for the current PCRs (``choose``) and opens with it
(``open_approved``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.approvals.accept import accepted
from agent.approvals.choose import Binding, choose
from agent.blobs import ReleaseBlob
from agent.config import AgentConfig
from agent.errors import AgentError
from agent.keystore import ApprovalStore
from agent.logsetup import log_fields
from agent.release import Bundle, open_release
from agent.signature import ReleaseTrust, verify_release
from agent.state import StateDir
from agent.tpm import Tpm
from keylease.api.v1.approvals import Approval

__all__ = [
    "ApprovalStore", "Binding", "Opened", "accepted", "keep_approvals", "keep_pushed",
    "open_approved",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Opened:
    bundle: Bundle
    approval: Approval | None  # None: a release from a broker before issue 11 (PolicyPCR)
    clock: int  # the TPM clock at the opening (ms)


def keep_approvals(
    store: ApprovalStore,
    approvals: Iterable[Approval],
    trust: ReleaseTrust,
    node_name: str,
    clock: int | None,
) -> tuple[Approval, ...]:
    """Check ``approvals`` and keep those that are this node's and the broker's; returns all
    held (expired ones dropped, ``clock``: the TPM's, when known)."""
    return store.merge(accepted(approvals, trust, node_name), clock)


def keep_pushed(cfg: AgentConfig, state: StateDir, approvals: tuple[Approval, ...]) -> None:
    """Approvals the watch stream pushed for a widened policy: kept once checked. Never a
    reason to drop anything; failing to keep them only costs an offline restore into that
    state (the next release brings them again)."""
    try:
        trust = ReleaseTrust.load(cfg.kbs_ca)
        held = keep_approvals(ApprovalStore(state), approvals, trust, cfg.node_name, None)
    except AgentError as exc:
        log.warning("could not keep the approvals the broker pushed: %s", exc.diagnostics())
        return
    log.info(
        "kept approvals from the watch stream (%s); %d held",
        "; ".join(a.describe() for a in approvals[:3]) or "none",
        len(held),
        extra=log_fields(cfg.node_name, "approvals"),
    )


def open_approved(
    tpm: Tpm,
    blob: ReleaseBlob,
    node_name: str,
    trust: ReleaseTrust,
    held: Sequence[Approval],
    event_log: Callable[[], bytes],
    pcrs: Mapping[str, Mapping[int, bytes]] | None = None,
    clock: int | None = None,
) -> Opened:
    """Open ``blob`` with the approval among ``held`` for the PCR values now (``pcrs``: just quoted,
    else read from the TPM) and the TPM clock (``clock``, else read). Raises ReleaseInvalid
    (NoApprovedState naming what differs when nothing approves this state) or InvalidKey."""
    now = clock if clock is not None else tpm.clock().clock
    if not blob.policy_group:
        return Opened(open_release(tpm, blob, node_name, trust), None, now)
    signer = verify_release(trust, blob)

    def read(bank: str, indices: Sequence[int]) -> Mapping[int, bytes]:
        if pcrs is not None and all(i in pcrs.get(bank, {}) for i in indices):
            return pcrs[bank]
        return tpm.read_pcrs(bank, indices)

    binding = Binding(node_name, blob.policy_group, signer.key)
    approval = choose(held, binding, read, now, trust, event_log)
    return Opened(open_release(tpm, blob, node_name, trust, approval), approval, now)

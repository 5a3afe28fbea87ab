"""The approvals a release carries: the state just verified, and every other state the broker
holds for the node that its policies still allow, all signed anew.

Each approval opens the node's sealed objects of this policy group while its TPM clock is below
the quote's clock plus ``approval_ttl_seconds`` (at most the lease): what a node keeps in its
state directory therefore never outlives the lease it was given with, however often it
renews. The release records what the node's cache is now bound to (``ReleaseBinding``), which
approvals pushed for a widened policy must match, and the node's states when they changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from kbs.approvals.states import allowed, new_state, policy_group, sign
from kbs.context import BrokerContext
from kbs.model import ApprovedState, Node, Policy
from kbs.policy.evaluate import Sealing
from kbs.store import ReleaseBinding
from kbs.store.approvals import MAX_STATES
from keylease.api.v1.approvals import Approval
from keylease.api.v1.tpmpolicy import sealed_auth_policy
from keylease.eventlog.bootstate import BootState

__all__ = ["ReleaseApprovals", "release_approvals"]


@dataclass(frozen=True)
class ReleaseApprovals:
    group: str
    auth_policy: bytes  # the sealed object's authPolicy
    approvals: tuple[Approval, ...]  # the current state's first
    binding: ReleaseBinding
    states: list[ApprovedState] | None  # the node's states, when they changed (to store)


def release_approvals(
    ctx: BrokerContext,
    node: Node,
    policies: Sequence[Policy],
    sealing: Sealing,
    state: BootState | None,
    quote_clock: int,
    now: datetime,
) -> ReleaseApprovals:
    """The binding and approvals of a release for ``node``, whose verified evidence passed
    ``policies`` (``sealing``: the covered PCR values; ``state``: its boot state in their bank;
    ``quote_clock``: its TPM clock at the quote, ms)."""
    signer = ctx.signer
    group = policy_group(policies)
    limit = quote_clock + ctx.config.approval_ttl_seconds * 1000
    held = ctx.store.approved_states(node.name)
    current = new_state(sealing, state, policies, "verified", now)
    kept: list[tuple[ApprovedState, Sealing]] = []
    for old in held:
        if old.bank == current.bank and old.pcrs == current.pcrs:
            if old.origin == "verified":
                current = old  # unchanged: nothing to write
            continue
        approved = allowed(old, policies)
        if approved is not None:
            kept.append((old, approved))
    kept = kept[len(kept) - (MAX_STATES - 1) :] if len(kept) >= MAX_STATES else kept
    states = sorted([*(s for s, _ in kept), current], key=lambda s: s.added_at)
    changed = states != held
    pairs = [(current, sealing), *kept]
    approvals = tuple(sign(signer, node.name, group, limit, s, a, policies, now) for s, a in pairs)
    return ReleaseApprovals(
        group=group,
        auth_policy=sealed_auth_policy(signer.public_key, node.name, group),
        approvals=approvals,
        binding=ReleaseBinding(limit, group, signer.fingerprint),
        states=states if changed else None,
    )

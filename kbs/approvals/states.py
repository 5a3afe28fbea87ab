"""Approved states: which boot states a node may reopen its sealed releases in, and the signed
approvals that say so.

A state is the values of the PCRs the node's policies cover, in their bank, and the components it
shows there. It is approved as long as the node's policies allow it: ``allowed`` evaluates it
exactly as an attestation is evaluated (``kbs.policy.evaluate``), so a policy that narrows stops
it from being signed again at the node's next release (what was signed before still opens until
its TPM-clock limit). ``sign`` makes one approval (``keylease.api.v1.approvals``) for one node,
policy group and limit; its components are the ones the policies name, for logs and status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from kbs.errors import AttestationFailed
from kbs.model import ApprovedState, Policy
from kbs.policy.evaluate import Sealing, evaluate
from kbs.policy.rules import CONTAINS_COMPONENTS
from kbs.signing import ReleaseSigner
from keylease.api.v1.approvals import Approval, ApprovedComponent, approval_payload
from keylease.eventlog.bootstate import BootState, Component
from keylease.eventlog.wording import ABSENT

__all__ = ["allowed", "new_state", "policy_group", "sign"]


def policy_group(policies: Sequence[Policy]) -> str:
    """The names of the policies a node is held to, sorted, joined by ",": what a release's
    sealed object is bound to (with the node's name), and approvals are for."""
    return ",".join(sorted(p.name for p in policies))


def _kept(component: Component, policies: Sequence[Policy]) -> Component:
    """What a state keeps of a component: its entries only where a policy has a ``contains``
    rule on it (a dbx lists hundreds)."""
    needed = component.name in CONTAINS_COMPONENTS and any(
        (r := p.document.rule(component.name)) is not None and r.contains for p in policies
    )
    return component if needed or not component.entries else replace(component, entries=())


def new_state(
    sealing: Sealing,
    state: BootState | None,
    policies: Sequence[Policy],
    origin: str,
    now: datetime,
) -> ApprovedState:
    """The state of ``sealing``'s PCR values, showing ``state``'s components (None: no log)."""
    components = tuple(_kept(c, policies) for c in state.components) if state else ()
    return ApprovedState(sealing.bank, tuple(sorted(sealing.pcrs.items())), components, origin, now)


def allowed(state: ApprovedState, policies: Sequence[Policy]) -> Sealing | None:
    """What ``policies`` approve of ``state`` (the values of the PCRs they cover), or None when
    they do not allow it, or cover a PCR it does not hold."""
    boot = BootState(state.bank, state.components, ()) if state.components else None
    try:
        return evaluate(policies, {state.bank: state.values}, {state.bank: boot} if boot else None)
    except AttestationFailed:
        return None


def _described(
    state: ApprovedState, sealing: Sealing, policies: Sequence[Policy]
) -> tuple[ApprovedComponent, ...]:
    names = list(dict.fromkeys(r.component for p in policies for r in p.document.rules))
    out = []
    for name in names:
        if name.startswith("pcr."):
            value = sealing.pcrs.get(int(name[4:]))
            out.append(ApprovedComponent(name, value.hex() if value else ABSENT, "PCR value"))
            continue
        found = next((c for c in state.components if c.name == name), None)
        out.append(
            ApprovedComponent(name, found.value, found.summary[:200])
            if found is not None
            else ApprovedComponent(name, ABSENT, "")
        )
    return tuple(out)


def sign(
    signer: ReleaseSigner,
    node_name: str,
    group: str,
    limit: int,
    state: ApprovedState,
    sealing: Sealing,
    policies: Sequence[Policy],
    now: datetime,
) -> Approval:
    """An approval of ``state`` (its PCR values as ``sealing`` covers them) for ``node_name``
    and ``group``, opening while the node's TPM clock is below ``limit``."""
    unsigned = Approval(
        node_name=node_name,
        policy_group=group,
        bank=sealing.bank,
        pcrs=tuple(sorted(sealing.pcrs.items())),
        clock_limit=limit,
        components=_described(state, sealing, policies),
        origin=state.origin,
        issued_at=int(now.timestamp()),
        signing_certificate=signer.certificate,
    )
    authorized = replace(unsigned, authorization=signer.sign(unsigned.authorization_message()))
    return replace(authorized, signature=signer.sign(approval_payload(authorized)))

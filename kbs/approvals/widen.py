"""A policy that widens approves new boot states for every node it concerns, at once.

When a policy change adds allowed values (``policy allow`` from a canary, ``learn``, ``apply``,
``set``), every approved node held to that policy whose sealed cache is bound to its current
policy group gets, signed for it (its name, its policy group, the signing key its cache is
bound to, the TPM-clock limit of its last release):

- the canary's verified state, where the node's other components (in the PCRs its policies
  cover) equal the canary's: the node will look exactly like the canary once updated;
- the state predicted from the node's own boot log with the canary's events for the widened
  components (``kbs.approvals.predict``), and with each newly allowed value of a component that
  is one event or a whole PCR.

Only states the node's policies (the changed one included) allow are approved; its current state
is not repeated (its release carries it). The states are stored with the node's others, so that
its releases sign them again while its policies allow them, and the approvals travel in the
change row that tells its agent about the change (``StatePush``). Nodes of one boot log and one
policy group share the work but the signatures, which are per node.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from kbs.approvals.predict import Swap, canary_swap, predict, value_swap
from kbs.approvals.states import allowed, policy_group, sign
from kbs.errors import PolicyDenied
from kbs.model import ApprovedState, BootRecord, Node, NodeState, Policy, selector_matches
from kbs.policy.evaluate import Sealing, sealed_pcrs
from kbs.policy.rules import AllowedValue, Document
from kbs.signing import SigningKeys
from kbs.store import StatePush, Store
from keylease.api.v1.approvals import encode_approvals
from keylease.eventlog.bootstate import COMPONENT_GROUPS, BootState, Component

__all__ = ["MAX_PREDICTED", "Canary", "widened", "widening_pushes"]

log = logging.getLogger(__name__)

MAX_PREDICTED = 8  # new states per node and policy change
_DECOMPOSED = {p for group in COMPONENT_GROUPS for p in group}

Candidates = list[tuple[ApprovedState, Sealing]]


@dataclass(frozen=True)
class Canary:
    """The node whose verified boot the operator allowed from."""

    node: Node
    boot: BootRecord | None


def widened(before: Document, after: Document) -> dict[str, tuple[AllowedValue, ...]]:
    """The values ``after`` allows that ``before`` did not, per component both name."""
    if before.bank != after.bank:
        return {}
    out = {}
    for rule in after.rules:
        old = before.rule(rule.component)
        if old is not None and old.allowed:
            new = tuple(a for a in rule.allowed if a.value not in old.values)
            if new:
                out[rule.component] = new
    return out


def _covered_values(node: Node, bank: str, covered: Sequence[int]) -> dict[int, bytes] | None:
    quoted = node.pcr_banks.get(bank, {})
    return {i: quoted[i] for i in covered} if all(i in quoted for i in covered) else None


def _in_covered(component: Component, covered: Sequence[int]) -> bool:
    return set(component.pcrs) <= set(covered)


def _differences(
    a: BootState | None, a_pcrs: Mapping[int, bytes], b: BootState | None,
    b_pcrs: Mapping[int, bytes],
) -> set[str]:  # fmt: skip
    """Components (in the covered PCRs) and raw covered PCRs whose values differ."""
    mine = {c.name: c.value for c in (a.components if a else ()) if _in_covered(c, list(a_pcrs))}
    theirs = {c.name: c.value for c in (b.components if b else ()) if _in_covered(c, list(b_pcrs))}
    out = {n for n in mine.keys() | theirs.keys() if mine.get(n) != theirs.get(n)}
    raw = (i for i in a_pcrs if i not in _DECOMPOSED)
    return out | {f"pcr.{i}" for i in raw if a_pcrs[i] != b_pcrs.get(i)}


def _value(state: BootState | None, pcrs: Mapping[int, bytes], name: str) -> str | None:
    """The value component ``name`` has in ``state`` (``pcr.N``: from ``pcrs``)."""
    if name.startswith("pcr."):
        value = pcrs.get(int(name[4:]))
        return value.hex() if value is not None else None
    found = state.get(name) if state else None
    return found.value if found else None


def _replaced(state: BootState | None, bank: str, new: Sequence[Component]) -> BootState:
    names = {c.name for c in new}
    kept = tuple(c for c in (state.components if state else ()) if c.name not in names)
    base = state or BootState(bank, (), ())
    return replace(base, components=(*kept, *new))


class _Planner:
    """The candidate states of one policy change, per (policy group, boot log, quoted values)."""

    def __init__(self, added: Mapping[str, Sequence[AllowedValue]], canary: Canary | None,
                 now: datetime) -> None:  # fmt: skip
        self.added, self.canary, self.now = added, canary, now
        self._cache: dict[tuple[object, ...], Candidates] = {}

    def candidates(
        self, policies: Sequence[Policy], bank: str, covered: dict[int, bytes],
        boot: BootRecord | None,
    ) -> Candidates:  # fmt: skip
        key = (policy_group(policies), boot.log_digest if boot else None, bank,
               tuple(sorted(covered.items())))  # fmt: skip
        if key not in self._cache:
            state = boot.states.get(bank) if boot else None
            self._cache[key] = self._plan(policies, bank, covered, state)
        return self._cache[key]

    def _plan(self, policies: Sequence[Policy], bank: str, covered: dict[int, bytes],
              state: BootState | None) -> Candidates:  # fmt: skip
        found = self._from_canary(bank, covered, state) if self.canary else []
        for name, values in self.added.items():
            for new in values:
                swap = value_swap(state or BootState(bank, (), ()), name, new.value)
                note = new.note.split(";")[0].strip()[:80]
                origin = f"predicted from the node's boot log: {name} {note}".strip()
                shown = [Component(name, (), new.value, note)]
                found += self._predicted(
                    bank, covered, state, [swap] if swap else [], shown, origin
                )
        out: Candidates = []
        seen = {tuple(sorted(covered.items()))}  # the node's current state: its release has it
        for candidate in found:
            sealing = allowed(candidate, policies)
            if sealing is None or tuple(sorted(sealing.pcrs.items())) in seen:
                continue
            seen.add(tuple(sorted(sealing.pcrs.items())))
            out.append((candidate, sealing))
        return out[:MAX_PREDICTED]

    def _from_canary(
        self, bank: str, covered: dict[int, bytes], state: BootState | None
    ) -> list[ApprovedState]:
        assert self.canary is not None
        name = self.canary.node.name
        boot = self.canary.boot
        c_state = boot.states.get(bank) if boot else None
        c_pcrs = self.canary.node.pcr_banks.get(bank, {})
        if not all(i in c_pcrs for i in covered):
            return []
        c_covered = {i: c_pcrs[i] for i in covered}
        found = []
        if _differences(state, covered, c_state, c_covered) <= set(self.added):
            comps = c_state.components if c_state else ()
            found.append(self._state(bank, c_covered, comps, f"canary {name}"))
        swaps: list[Swap] = []
        shown: list[Component] = []
        for component, values in self.added.items():
            seen = _value(c_state, c_pcrs, component)
            swap = canary_swap(c_state, component, c_pcrs)
            if swap is not None and seen in {v.value for v in values}:
                swaps.append(swap)
                shown += [c for c in (c_state.components if c_state else ()) if c.name == component]
        origin = f"predicted from the node's boot log with canary {name}'s " + ", ".join(
            s.component for s in swaps
        )
        return found + self._predicted(bank, covered, state, swaps, shown, origin)

    def _state(self, bank: str, pcrs: Mapping[int, bytes], components: Sequence[Component],
               origin: str) -> ApprovedState:  # fmt: skip
        return ApprovedState(bank, tuple(sorted(pcrs.items())), tuple(components), origin, self.now)

    def _predicted(self, bank: str, covered: dict[int, bytes], state: BootState | None,
                   swaps: Sequence[Swap], shown: Sequence[Component],
                   origin: str) -> list[ApprovedState]:  # fmt: skip
        if not swaps:
            return []
        values = predict(state or BootState(bank, (), ()), covered, swaps)
        if values is None:
            return []
        components = _replaced(state, bank, [c for c in shown if c.name])
        return [self._state(bank, values, components.components, origin)]


def widening_pushes(
    store: Store,
    signing: SigningKeys,
    before: Policy | None,
    after: Policy,
    canary: Canary | None,
    now: datetime,
) -> dict[str, StatePush]:
    """The approved states and signed approvals ``after`` gives each node it concerns, where it
    allows more than ``before``."""
    added = widened(before.document, after.document) if before is not None else {}
    if not added:
        return {}
    policies = [p for p in store.list_policies() if p.name != after.name] + [after]
    planner = _Planner(added, canary, now)
    records = store.boot_records()
    pushes: dict[str, StatePush] = {}
    for node in store.list_nodes():
        if node.state is not NodeState.APPROVED or node.approval_limit is None:
            continue
        mine = [p for p in policies if any(selector_matches(s, node.labels) for s in p.selectors)]
        signer = signing.by_fingerprint(node.release_signer or "")
        if after not in mine or signer is None or policy_group(mine) != node.release_group:
            continue
        try:
            bank, indices = sealed_pcrs(mine)
        except PolicyDenied:
            continue
        covered = _covered_values(node, bank, indices)
        if covered is None:
            continue
        found = planner.candidates(mine, bank, covered, records.get(node.name))
        if not found:
            continue
        group = policy_group(mine)
        approvals = [
            sign(signer, node.name, group, node.approval_limit, s, a, mine, now) for s, a in found
        ]
        pushes[node.name] = StatePush(tuple(s for s, _ in found), encode_approvals(approvals))
    log.info("policy %s widened: approvals pushed to %d node(s)", after.name, len(pushes))
    return pushes

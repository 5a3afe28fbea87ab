"""The policy decision: every policy assigned to a node must allow what its boot showed.

Input is verified evidence only: the quoted PCR values per bank (signature checked) and the boot
state of an event log that replayed to them. Each policy is evaluated in its own bank. A node
passes a rule when its component's value is among the allowed values and, for ``contains`` rules,
its variable holds every listed entry; a component the node does not show has the value
``absent``. When a policy names boot applications, the node must show exactly the ones it names
(an extra image loaded is denied). Every failing component of every policy is named in the
denial, with the value seen and what is allowed::

    PCR 4, boot application 3 [boot-app.3] (\\EFI\\debian\\vmlinuz): digest 9f2c1a…e1 is not
    allowed by policy prod-boot (allowed: 6.1.0-27 ab12cd…01, 6.1.0-28 cd34ef…99)

The release is then sealed to the quoted values, in the policies' bank, of every PCR they cover.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kbs.errors import (
    EventLogMismatch,
    EventLogMissing,
    NoPolicy,
    PcrSelectionMismatch,
    PolicyDenied,
)
from kbs.model import Policy
from kbs.policy.rules import ABSENT, Rule, component_label, short_value
from keylease.eventlog.bootstate import BootState, Component
from keylease.eventlog.wording import not_allowed, where

__all__ = ["Sealing", "evaluate", "node_component", "rule_passes", "sealed_pcrs"]


@dataclass(frozen=True)
class Sealing:
    """What the release is sealed to."""

    bank: str
    pcrs: Mapping[int, bytes]


def node_component(
    name: str, bank: str, quoted: Mapping[str, Mapping[int, bytes]], state: BootState | None
) -> Component | None:
    """The node's component ``name`` in ``bank``: a raw PCR from the quote, else from the boot
    state; None when the node does not show it (or sent no log: ``state`` None)."""
    if name.startswith("pcr."):
        index = int(name[4:])
        value = quoted.get(bank, {}).get(index)
        return None if value is None else Component(name, (index,), value.hex(), "quoted value")
    return state.get(name) if state is not None else None


def rule_passes(rule: Rule, found: Component | None) -> bool:
    value = found.value if found is not None else ABSENT
    if rule.allowed and value not in rule.values:
        return False
    return not rule.contains or (found is not None and set(rule.contains) <= set(found.entries))


def _allowed(rule: Rule) -> tuple[list[tuple[str, str]], list[str]]:
    more = [f"any value containing {len(rule.contains)} required entries"] if rule.contains else []
    return [(a.note, a.value) for a in rule.allowed], more


def _failure(rule: Rule, found: Component | None, policy: str) -> str:
    value = found.value if found is not None else ABSENT
    summary = found.summary if found is not None else None
    if rule.allowed and value not in rule.values:
        return not_allowed(rule.component, summary, value, policy, *_allowed(rule))
    missing = sorted(set(rule.contains) - set(found.entries if found else ()))
    return (
        f"{where(rule.component, summary)}: lacks {len(missing)} "
        f"entr{'y' if len(missing) == 1 else 'ies'} that policy {policy} requires "
        f"({', '.join(short_value(m) for m in missing[:3])})"
    )


def _extra_apps(policy: Policy, state: BootState | None) -> list[str]:
    """Boot applications the node loaded that a policy naming boot applications does not."""
    named = {r.component for r in policy.document.rules if r.component.startswith("boot-app.")}
    if not named or state is None:
        return []
    return [
        f"PCR 4, {component_label(c.name)} [{c.name}] ({c.summary}): digest "
        f"{short_value(c.value)} is not in policy {policy.name}, which names "
        f"{', '.join(sorted(named, key=lambda n: int(n[9:])))}"
        for c in state.components
        if c.name.startswith("boot-app.") and c.name not in named
    ]


def sealed_pcrs(policies: Sequence[Policy]) -> tuple[str, tuple[int, ...]]:
    """The bank and PCRs a release for these policies is sealed to."""
    banks = sorted({p.document.bank for p in policies})
    if len(banks) > 1:
        raise PolicyDenied(
            f"the policies assigned to this node are over different PCR banks "
            f"({', '.join(f'{p.name}: {p.document.bank}' for p in policies)}); keep one bank "
            "per node (`keylease-kbs policy show` and `policy assign`)"
        )
    return banks[0], tuple(sorted({i for p in policies for i in p.document.pcrs}))


def evaluate(
    policies: Sequence[Policy],
    quoted: Mapping[str, Mapping[int, bytes]],
    states: Mapping[str, BootState] | None,
) -> Sealing:
    """Decide on verified evidence: ``quoted`` bank -> PCR -> value, ``states`` the boot state
    of a replayed event log per bank (None when the node sent no log). Raises NoPolicy,
    PcrSelectionMismatch, EventLogMissing, EventLogMismatch or PolicyDenied naming every failing
    component."""
    if not policies:
        raise NoPolicy(
            "no attestation policy is assigned to this node; an operator must run "
            "`keylease-kbs policy assign NAME --selector k=v` matching its labels"
        )
    bank, covered = sealed_pcrs(policies)
    values = quoted.get(bank)
    if values is None:
        raise PcrSelectionMismatch(
            f"policy {', '.join(p.name for p in policies)} is over the {bank} bank but the "
            f"node's TPM quoted {', '.join(sorted(quoted)) or 'no bank'}: activate {bank} in "
            "its TPM or write the policy over a bank it has (--bank)"
        )
    missing = [i for i in covered if i not in values]
    if missing:
        raise PcrSelectionMismatch(
            f"PCRs {','.join(map(str, missing))} required by policy are not quoted"
        )
    needs_log = [
        p.name
        for p in policies
        if any(not r.component.startswith("pcr.") for r in p.document.rules)
    ]
    state = None
    if needs_log:
        if states is None:
            raise EventLogMissing(
                f"policy {', '.join(needs_log)} names boot components, but this node sent no "
                "boot event log: set event_log in agent.toml to the firmware's TCG event log "
                "(default /sys/kernel/security/tpm0/binary_bios_measurements; securityfs must "
                "be mounted) and make sure the agent can read it"
            )
        state = states.get(bank)
        if state is None:
            raise EventLogMismatch(
                f"the node's event log carries no {bank} digests, and policy "
                f"{', '.join(needs_log)} is over {bank}"
            )
    failures: list[str] = []
    for policy in policies:
        for rule in policy.document.rules:
            found = node_component(rule.component, bank, quoted, state)
            if not rule_passes(rule, found):
                failures.append(_failure(rule, found, policy.name))
        failures += _extra_apps(policy, state)
    if failures:
        raise PolicyDenied("; ".join(failures), covered)
    return Sealing(bank, {i: values[i] for i in covered})

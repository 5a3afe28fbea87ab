"""Policies from nodes: ``learn`` (a node's verified boot becomes the reference), ``allow`` (add
what another node shows: the canary of an update), ``diff`` (what a node shows against a policy),
and the change lines ``policy apply`` and ``policy allow`` print.

The evidence is what the broker recorded from the node's last verified attestation: the quoted
PCR values per bank and the boot state of its replayed event log (``kbs.model.BootRecord``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from kbs.errors import OperatorError
from kbs.model import BootRecord, Node, NodeState, Policy, format_selector
from kbs.policy.evaluate import node_component, rule_passes
from kbs.policy.rules import ABSENT, AllowedValue, Document, Rule, check_document, short_value
from keylease.eventlog.bootstate import COMPONENT_GROUPS, BootState, Component

__all__ = ["DiffRow", "allow", "change_lines", "diff", "learn"]

MAX_SUMMARY_IN_NOTE = 120


@dataclass(frozen=True)
class DiffRow:
    component: str
    pcrs: tuple[int, ...]
    node_value: str  # "absent" when the node does not show it
    node_summary: str
    result: str  # "pass", "fail", or "not in policy"
    allowed: str  # the allowed values, as text


def _evidence(node: Node, boot: BootRecord | None, bank: str) -> BootState | None:
    if node.state is NodeState.REVOKED:
        raise OperatorError(
            f"node {node.name!r} is revoked; take reference values from a trusted node"
        )
    if node.last_attested_at is None:
        raise OperatorError(
            f"node {node.name!r} has no verified attestation yet; run its agent "
            "(`keylease-agent attest --once`) and try again"
        )
    if bank not in node.pcr_banks:
        raise OperatorError(
            f"node {node.name!r} last quoted {', '.join(sorted(node.pcr_banks)) or 'no bank'}, "
            f"not {bank} (choose the policy's bank with --bank)"
        )
    return boot.states.get(bank) if boot is not None else None


def _note(found: Component | None, verb: str, node: Node, when: datetime) -> str:
    what = "not measured" if found is None else found.summary[:MAX_SUMMARY_IN_NOTE]
    return f"{what}; {verb} {node.name} {when:%Y-%m-%d}"


def learn(
    node: Node, boot: BootRecord | None, bank: str, pcrs: Sequence[int] | None, now: datetime
) -> Document:
    """A policy allowing exactly the node's last verified boot, over ``pcrs`` (default: every
    PCR its event log extends): the components of each PCR (``absent`` for one it does not
    show, so that one appearing later is denied) and raw ``pcr.N`` for the others."""
    state = _evidence(node, boot, bank)
    if state is None:
        raise OperatorError(
            f"node {node.name!r} sent no boot event log in its last attestation, so it shows no "
            f"components: set event_log in its agent.toml, or make a policy of raw PCR values "
            f"with `keylease-kbs policy set NAME --pcrs 0,1,... --from-node {node.name}`"
        )
    wanted = sorted(set(pcrs)) if pcrs else list(state.touched)
    quoted = node.pcr_banks[bank]
    missing = [i for i in wanted if i not in quoted]
    if missing:
        raise OperatorError(f"node {node.name!r} did not quote PCR {','.join(map(str, missing))}")
    names: list[str] = []
    covered: set[int] = set()
    for group, members in COMPONENT_GROUPS.items():
        if not set(group) & set(wanted):
            continue
        covered.update(group)
        for member in members:
            if member == "boot-app":
                names += [c.name for c in state.components if c.name.startswith("boot-app.")]
            else:
                names.append(member)
    names += [f"pcr.{i}" for i in wanted if i not in covered]
    rules = []
    for name in names:
        found = node_component(name, bank, node.pcr_banks, state)
        value = found.value if found is not None else ABSENT
        rules.append(Rule(name, (AllowedValue(value, _note(found, "learned from", node, now)),)))
    return check_document(bank, rules)


def allow(
    policy: Policy, node: Node, boot: BootRecord | None, components: Sequence[str], now: datetime
) -> Document:
    """``policy`` widened with the values the node shows for ``components`` (default: every
    component the policy names; a component named here that the policy lacks is added)."""
    doc = policy.document
    state = _evidence(node, boot, doc.bank)
    names = list(components) or [r.component for r in doc.rules]
    rules = {r.component: r for r in doc.rules}
    for name in names:
        found = node_component(name, doc.bank, node.pcr_banks, state)
        if found is None and not name.startswith("pcr.") and state is None:
            raise OperatorError(
                f"node {node.name!r} sent no boot event log, so it shows no component {name}"
            )
        if name.startswith("pcr.") and found is None:
            raise OperatorError(f"node {node.name!r} did not quote {name}")
        value = found.value if found is not None else ABSENT
        rule = rules.get(name, Rule(name))
        if value not in rule.values:
            added = AllowedValue(value, _note(found, "allowed from", node, now))
            rules[name] = Rule(name, (*rule.allowed, added), rule.contains)
    return check_document(doc.bank, rules.values())


def _allowed(rule: Rule | None) -> str:
    if rule is None:
        return "-"
    parts = [
        f"{short_value(a.value)} ({a.note})" if a.note else short_value(a.value)
        for a in rule.allowed
    ]
    if rule.contains:
        parts.append(f"containing {', '.join(short_value(c) for c in rule.contains)}")
    return "; ".join(parts)


def diff(policy: Policy, node: Node, boot: BootRecord | None) -> list[DiffRow]:
    """Per component the policy names (and any boot application it lacks): the node's last
    verified value and whether it passes."""
    bank = policy.document.bank
    state = _evidence(node, boot, bank)
    rows = []
    for rule in policy.document.rules:
        found = node_component(rule.component, bank, node.pcr_banks, state)
        rows.append(
            DiffRow(
                rule.component,
                rule.pcrs,
                found.value if found else ABSENT,
                found.summary if found else "",
                "pass" if rule_passes(rule, found) else "fail",
                _allowed(rule),
            )
        )
    named = {r.component for r in policy.document.rules}
    if state is not None:
        for c in state.components:
            if c.name not in named:
                extra_app = c.name.startswith("boot-app.") and any(
                    n.startswith("boot-app.") for n in named
                )
                rows.append(
                    DiffRow(
                        c.name,
                        c.pcrs,
                        c.value,
                        c.summary,
                        "fail" if extra_app else "not in policy",
                        "-",
                    )
                )
    return rows


def change_lines(before: Policy | None, after: Policy, selectors_given: bool = True) -> list[str]:
    """What changed from ``before`` to ``after``, one line each ("+"/"-"), for apply/allow."""
    if (
        before is not None
        and before.document == after.document
        and (
            not selectors_given
            or set(map(format_selector, before.selectors))
            == set(map(format_selector, after.selectors))
        )
    ):
        return []
    lines = [] if before is not None else [f"+ policy {after.name} ({after.document.bank})"]
    if before is not None and before.document.bank != after.document.bank:
        lines.append(f"~ bank {before.document.bank} -> {after.document.bank}")
    old = {r.component: r for r in (before.document.rules if before else ())}
    new = {r.component: r for r in after.document.rules}
    for name in sorted(old.keys() - new.keys()):
        lines.append(f"- component {name}")
    for rule in after.document.rules:
        was = old.get(rule.component)
        was_values = {a.value: a for a in was.allowed} if was else {}
        for a in rule.allowed:
            if a.value not in was_values:
                lines.append(f"+ {rule.component}: {short_value(a.value)} ({a.note})")
            elif was_values[a.value].note != a.note:
                lines.append(f"~ {rule.component}: {short_value(a.value)} note: {a.note}")
        for v in sorted(set(was_values) - rule.values):
            lines.append(f"- {rule.component}: {short_value(v)}")
        for c in sorted(set(rule.contains) - set(was.contains if was else ())):
            lines.append(f"+ {rule.component} contains {short_value(c)}")
        for c in sorted(set(was.contains if was else ()) - set(rule.contains)):
            lines.append(f"- {rule.component} contains {short_value(c)}")
    if selectors_given:
        old_sel = {format_selector(s) for s in (before.selectors if before else ())}
        new_sel = {format_selector(s) for s in after.selectors}
        lines += [f"+ assigned to {s}" for s in sorted(new_sel - old_sel)]
        lines += [f"- assignment {s}" for s in sorted(old_sel - new_sel)]
    return lines

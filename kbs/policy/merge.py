"""Policies that one node could be held to together, and whether any boot could pass them all.

A node is held to every policy assigned to a selector its labels match; two selectors can match
one node unless they give one key two values. Such policies must be over one PCR bank (the
release is sealed in one), and for every component both name, some value must be allowed by both
(their intersection): otherwise no node matching both selectors can ever pass, which is refused
when the policy is assigned, changed or applied, naming the component. ``contains`` rules always
have a common solution (a variable holding both sets), so they are not checked here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from kbs.errors import OperatorError
from kbs.model import Policy, format_selector, selectors_overlap

__all__ = ["check_compatible"]


def _overlap(a: Sequence[Mapping[str, str]], b: Sequence[Mapping[str, str]]) -> str | None:
    for sa in a:
        for sb in b:
            if selectors_overlap(sa, sb):
                merged = {**sa, **sb}
                return format_selector(merged)
    return None


def check_compatible(policy: Policy, others: Iterable[Policy]) -> None:
    """Raise OperatorError if ``policy`` (with its selectors) and another policy could apply to
    one node while no boot could pass both."""
    for other in others:
        if other.name == policy.name:
            continue
        labels = _overlap(policy.selectors, other.selectors)
        if labels is None:
            continue
        if other.document.bank != policy.document.bank:
            raise OperatorError(
                f"policies {policy.name} ({policy.document.bank}) and {other.name} "
                f"({other.document.bank}) would both apply to nodes labelled {labels}; the "
                "policies of one node must be over one PCR bank"
            )
        for rule in policy.document.rules:
            theirs = other.document.rule(rule.component)
            if theirs is None or not rule.allowed or not theirs.allowed:
                continue
            if not rule.values & theirs.values:
                raise OperatorError(
                    f"policies {policy.name} and {other.name} would both apply to nodes "
                    f"labelled {labels} but allow no common value for component "
                    f"{rule.component}: no node could pass both (widen one of them, e.g. "
                    f"`keylease-kbs policy allow`, or assign them to disjoint selectors)"
                )

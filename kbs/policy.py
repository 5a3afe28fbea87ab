"""Attestation policy evaluation: every policy assigned to a node must match its quoted PCRs.

Empty policy means deny: a node with no assigned policy gets nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kbs.errors import NoPolicy, PcrSelectionMismatch, PolicyDenied
from kbs.model import Policy

__all__ = ["evaluate", "required_pcrs"]


def required_pcrs(policies: Sequence[Policy]) -> dict[int, bytes]:
    """The PCR values the node must show, merged over all its policies.

    Two policies that demand different values for one PCR can never both pass; that is refused
    here rather than silently preferring one.
    """
    merged: dict[int, bytes] = {}
    for policy in policies:
        for index, value in policy.pcrs.items():
            if index in merged and merged[index] != value:
                raise PolicyDenied(
                    f"policies assigned to this node disagree on PCR {index}; "
                    "fix the assignments with `keylease-kbs policy assign`"
                )
            merged[index] = value
    return merged


def evaluate(
    policies: Sequence[Policy], bank: str, quoted: Mapping[int, bytes]
) -> dict[int, bytes]:
    """Check the quoted (already signature-verified) PCR values against every policy.

    Returns the PCR values the release will be sealed to. Raises NoPolicy if nothing is assigned,
    PcrSelectionMismatch if the bank differs or a PCR is absent, PolicyDenied naming every PCR
    that differs.
    """
    if not policies:
        raise NoPolicy(
            "no attestation policy is assigned to this node; an operator must run "
            "`keylease-kbs policy assign NAME --selector k=v` matching its labels"
        )
    for policy in policies:
        if policy.pcr_bank != bank:
            raise PcrSelectionMismatch(
                f"policy {policy.name!r} is over the {policy.pcr_bank} bank but the quote is "
                f"over {bank}"
            )
    required = required_pcrs(policies)
    if not required:
        raise NoPolicy("the policies assigned to this node cover no PCR; empty policy means deny")
    missing = sorted(set(required) - set(quoted))
    if missing:
        raise PcrSelectionMismatch(f"PCRs {_list(missing)} required by policy are not quoted")
    differing = [i for i in sorted(required) if quoted[i] != required[i]]
    if differing:
        names = ", ".join(sorted(p.name for p in policies if set(p.pcrs) & set(differing)))
        details = "; ".join(
            f"PCR {i}: expected {required[i].hex()}, got {quoted[i].hex()}" for i in differing
        )
        raise PolicyDenied(
            f"PCR {_list(differing)} ({bank}) {'differs' if len(differing) == 1 else 'differ'} "
            f"from policy {names}: {details}",
            differing,
        )
    return required


def _list(indices: Sequence[int]) -> str:
    return ",".join(str(i) for i in indices)

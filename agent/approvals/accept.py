"""Which approvals from the broker this agent keeps: each must be for this node, and signed by
the broker (its certificate issued by ``kbs_ca``, marked for signing, valid when the approval was
issued; both signatures verifying: ``keylease.api.v1.approvals.verify_approval``). Anything else
is refused with one log line and never stored."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agent.errors import ReleaseInvalid
from agent.signature import ReleaseTrust
from keylease.api.v1.approvals import Approval, verify_approval
from keylease.api.v1.signing import SigningCertificate
from keylease.text import printable

__all__ = ["accepted"]

log = logging.getLogger(__name__)


def accepted(approvals: Iterable[Approval], trust: ReleaseTrust, node_name: str) -> list[Approval]:
    """The approvals that are this node's and the broker's; the others are logged and left."""
    checked: dict[bytes, SigningCertificate] = {}
    kept = []
    for a in approvals:
        try:
            if a.node_name != node_name:
                raise ReleaseInvalid(
                    f"it is for node {printable(a.node_name, 64)!r}, not {node_name!r}"
                )
            verify_approval(a, trust.issuers, ReleaseInvalid, checked)
        except ReleaseInvalid as exc:
            log.warning("refused an approval (%s): %s", printable(a.origin, 80), exc)
            continue
        kept.append(a)
    return kept

"""The approvals this node holds: ``state_dir/approvals.bin``, an ``ApprovalList``.

They arrive with each release and on the watch stream when a policy widens; each was checked
against the broker's signatures before it is kept (``agent.approvals.accept``) and is checked
again before it is used. They go with the sealed cache on a verdict (``SealedCache.drop``).
Kept: one per approved state (node, policy group, PCR values, signing key), the one that expires
last; approvals already past their limit in the TPM's clock are dropped, and at most
``MAX_APPROVALS``, those that expire last. A damaged file is read as none (the next release
brings new ones).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agent.errors import AgentError, StateError
from agent.state import StateDir
from keylease.api.v1.approvals import Approval, decode_approvals, encode_approvals
from keylease.api.v1.limits import MAX_APPROVALS

__all__ = ["APPROVALS", "ApprovalStore"]

log = logging.getLogger(__name__)

APPROVALS = "approvals.bin"


class ApprovalStore:
    def __init__(self, state: StateDir) -> None:
        self._state = state

    def load(self) -> tuple[Approval, ...]:
        """The approvals held; none when the file is missing or damaged."""
        data = self._state.read(APPROVALS)
        if data is None:
            return ()
        try:
            return decode_approvals(data, StateError)
        except StateError as exc:
            log.warning("%s is damaged (%s); holding no approvals until the next release",
                        self._state.path / APPROVALS, exc)  # fmt: skip
            return ()

    def merge(self, new: Iterable[Approval], clock: int | None) -> tuple[Approval, ...]:
        """Keep ``new`` with the approvals held; drop those at or past ``clock`` (the TPM's,
        when known). Returns what is now held."""
        best: dict[tuple[object, ...], Approval] = {}
        for a in (*self.load(), *new):
            if clock is not None and a.clock_limit <= clock:
                continue
            key = (a.node_name, a.policy_group, a.bank, a.pcrs, a.signing_certificate)
            if key not in best or best[key].clock_limit < a.clock_limit:
                best[key] = a
        held = sorted(best.values(), key=lambda a: a.clock_limit)[-MAX_APPROVALS:]
        self._state.write(APPROVALS, encode_approvals(held))
        return tuple(held)

    def drop(self) -> None:
        try:
            self._state.remove(APPROVALS)
        except AgentError as exc:
            log.warning("cannot remove %s: %s", self._state.path / APPROVALS, exc)

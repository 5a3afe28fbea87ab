"""Which refusals of the node API reach the audit log, and a log that cannot be flooded.

Anyone who can reach the node listener can make the broker refuse something: GetNonce or Watch
for a name that is not enrolled, an Attest without a valid nonce, an enrollment with an EK
certificate that does not chain. Such a refusal proves nothing about any node — the caller may
be anyone — so writing each as an audit row would let strangers grow the audit table without
bound and bury what operators look for. Only refusals that came *after* the node proved
itself are audit rows: every refusal of a GetNonce, Attest or Watch (admission let them through
only with the node's MAC, ``AUTHENTICATED_EVENTS``), and those raised once a quote verified with
the enrolled AK over the broker's nonce (``PROVEN_REFUSALS``). Every other refusal is counted
(``keylease_unproven_refusals_total{event, reason}``) and logged through ``ThrottledLog``: at
most one line per kind every ``LOG_INTERVAL`` seconds, saying how many were left out.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from kbs import errors as e

__all__ = [
    "AUTHENTICATED_EVENTS",
    "LOG_INTERVAL",
    "PROVEN_REFUSALS",
    "ThrottledLog",
    "proves_identity",
]

LOG_INTERVAL = 10.0
MAX_KINDS = 1024

# Raised only once the node's quote verified: signature by the enrolled AK, qualifying data over
# the broker's single-use nonce (kbs.quote steps 1-4). Whoever sent it holds the node's TPM.
PROVEN_REFUSALS: frozenset[type[e.KbsError]] = frozenset(
    {
        e.PcrSelectionMismatch,
        e.PcrDigestMismatch,
        e.EventLogMismatch,
        e.NodeNotApproved,
        e.NoPolicy,
        e.PolicyDenied,
        e.NotGranted,
    }
)


# The steps whose calls admission lets through only with the named node's MAC
# (kbs.nodeapi.nodeauth): any refusal there is a refusal of that node.
AUTHENTICATED_EVENTS = frozenset({"nonce", "attest", "watch"})


def proves_identity(event: str, exc: e.KbsError) -> bool:
    """Whether ``exc`` was raised after the node proved itself (an audit row), else a metric:
    every refusal of an authenticated call, and the refusals that need a verified quote."""
    return event in AUTHENTICATED_EVENTS or type(exc) in PROVEN_REFUSALS


class ThrottledLog:
    """A logger that writes at most one line per kind every ``interval`` seconds; the next line
    of that kind says how many it left out. At most ``MAX_KINDS`` kinds are remembered."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._kinds: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def log(self, level: int, kind: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line of ``kind`` went out less than ``interval`` ago;
        returns whether it was written."""
        now = self._clock()
        last, left_out = self._kinds.pop(kind, (-math.inf, 0))
        if now - last < self._interval:
            self._kinds[kind] = (last, left_out + 1)
            return False
        if left_out:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, left_out, now - last)
        self._log.log(level, msg, *args)
        self._kinds[kind] = (now, 0)
        if len(self._kinds) > MAX_KINDS:
            self._kinds.popitem(last=False)
        return True

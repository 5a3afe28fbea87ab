"""The lease the daemon holds keys under, measured so that a clock step cannot move its end.

A release says when it was issued and until when its keys may be used (``issued_at``,
``not_after``: the broker's clock). A lease received from the broker lasts ``not_after -
issued_at`` from the moment its attestation began, on this process's monotonic clock, so the
node's wall clock — wrong, or stepped forward or back while the agent runs — neither ends it
early nor keeps keys past it. A lease restored from the sealed cache at start can only be judged
by the wall clock (the monotonic clock restarts with the machine): it ends at ``not_after`` as the
wall clock reads at restore, as before, and is measured monotonically from then on, so a clock
set back later cannot extend it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Lease"]

Clock = Callable[[], float]


@dataclass(frozen=True)
class Lease:
    not_after: datetime  # the broker's not-after (for status and logs)
    deadline: float  # the end, in time.monotonic() seconds

    @classmethod
    def received(cls, issued_at: datetime, not_after: datetime, asked_at: float) -> Lease:
        """A lease from the broker; ``asked_at``: monotonic time before the attestation began
        (the release was issued after it, so the lease ends no later than the broker's)."""
        return cls(not_after, asked_at + max(0.0, (not_after - issued_at).total_seconds()))

    @classmethod
    def restored(cls, not_after: datetime, now: datetime, clock: Clock = time.monotonic) -> Lease:
        """A lease from the sealed cache, judged by the wall clock ``now`` once."""
        return cls(not_after, clock() + max(0.0, (not_after - now).total_seconds()))

    def remaining(self, clock: Clock = time.monotonic) -> float:
        return self.deadline - clock()

    def ended(self, clock: Clock = time.monotonic) -> bool:
        return clock() >= self.deadline

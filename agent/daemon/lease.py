"""The lease the daemon holds keys under, measured so that the node's wall clock cannot move it.

A release says when it was issued and until when its keys may be used (``issued_at``,
``not_after``: the broker's clock). A lease received from the broker lasts ``not_after -
issued_at`` from the moment its attestation began, on this process's monotonic clock, so the
node's wall clock — wrong, or stepped forward or back while the agent runs — neither ends it
early nor keeps keys past it. A lease restored from the sealed cache at start is measured in the
TPM's clock (issue 11): the release says where it ends there (``lease_clock_limit``), the TPM
says where its clock is now, and the rest is measured monotonically, so a clock set back later
cannot extend it. Only a cache from a broker before issue 11 says nothing of TPM time: its lease
ends at ``not_after`` as the wall clock reads at restore, as before.
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
    def in_tpm_time(
        cls, not_after: datetime, limit: int, tpm_clock: int, clock: Clock = time.monotonic
    ) -> Lease:
        """A lease ending at TPM clock ``limit`` (ms), the TPM's clock being ``tpm_clock`` now."""
        return cls(not_after, clock() + max(0, limit - tpm_clock) / 1000)

    @classmethod
    def restored(cls, not_after: datetime, now: datetime, clock: Clock = time.monotonic) -> Lease:
        """A lease from a cache without TPM time, judged by the wall clock ``now`` once."""
        return cls(not_after, clock() + max(0.0, (not_after - now).total_seconds()))

    def remaining(self, clock: Clock = time.monotonic) -> float:
        return self.deadline - clock()

    def ended(self, clock: Clock = time.monotonic) -> bool:
        return clock() >= self.deadline

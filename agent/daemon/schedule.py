"""When the daemon attests next (DESIGN.md step 6).

- after an attestation that installed keys: at about two thirds of the lease, with jitter;
- after a failure: exponential backoff with jitter up to ``retry_max_seconds``, and no sooner
  than a busy broker's ``retry-after-ms`` hint (RESOURCE_EXHAUSTED; at most
  ``MAX_RETRY_HINT_SECONDS``), which watch and network wakes respect too;
- on a watch or network wake: now, unless the broker asked to wait.

Times are ``time.monotonic()`` seconds; the random source is the daemon's (seedable).
"""

from __future__ import annotations

import random
import time

from agent.errors import AgentError, BrokerBusy

__all__ = ["MAX_RETRY_HINT_SECONDS", "RENEW_AT", "Backoff", "Schedule"]

RENEW_AT = 2 / 3
MAX_RETRY_HINT_SECONDS = 300.0  # a busy broker's retry-after hint is honoured up to this


class Backoff:
    """Exponential backoff with jitter: 1, 2, 4, ... seconds up to ``maximum``, times 0.5-1."""

    def __init__(self, maximum: float, rng: random.Random, initial: float = 1.0) -> None:
        self.maximum, self.initial, self.rng, self.attempt = maximum, initial, rng, 0

    def next(self) -> float:
        delay: float = min(self.maximum, self.initial * float(2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay * self.rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


class Schedule:
    """The next attestation's time, ``next_attempt``, and how each outcome moves it."""

    def __init__(self, retry_max_seconds: float, rng: random.Random) -> None:
        self._rng = rng
        self._backoff = Backoff(retry_max_seconds, rng)
        self.next_attempt = 0.0
        self._not_before = 0.0  # a busy broker's hint: watch/network wakes wait for it too

    def due(self) -> bool:
        return time.monotonic() >= self.next_attempt

    def renew(self, remaining_seconds: float) -> float:
        """Keys installed for ``remaining_seconds`` more: renew at about RENEW_AT of that.
        Returns the delay in seconds."""
        self._backoff.reset()
        self._not_before = 0.0
        remaining = max(1.0, remaining_seconds)
        delay = remaining * RENEW_AT * self._rng.uniform(0.85, 1.0)
        self.next_attempt = time.monotonic() + delay
        return delay

    def retry(self, exc: AgentError) -> float:
        """The attempt failed with ``exc``: back off. Returns the delay in seconds."""
        delay = self._backoff.next()
        if isinstance(exc, BrokerBusy) and exc.retry_after_seconds is not None:
            # the broker's hint is a floor (spread a little, so refused nodes do not return
            # together), bounded in case a broker asks for something absurd
            hint = min(exc.retry_after_seconds, MAX_RETRY_HINT_SECONDS)
            delay = max(delay, hint * self._rng.uniform(1.0, 1.25))
            self._not_before = time.monotonic() + delay
        self.next_attempt = time.monotonic() + delay
        return delay

    def back_off(self) -> None:
        """Something went wrong outside an attempt (revoked, an unexpected error): wait."""
        self.next_attempt = time.monotonic() + self._backoff.next()

    def soon(self) -> None:
        """Attest again now, unless a busy broker asked to wait."""
        self.next_attempt = max(time.monotonic(), self._not_before)

    def restart(self, retry_max_seconds: float) -> None:
        """A new configuration (perhaps another broker): a fresh backoff, and attest now."""
        self._backoff = Backoff(retry_max_seconds, self._rng)
        self.next_attempt = self._not_before = time.monotonic()

"""When expired single-use rows (nonces, enrollment challenges) are purged.

Not on every request: at most once per ``PURGE_EVERY`` seconds per table and process (the
``expires_at`` indexes keep each purge cheap), and only rows expired for longer than
``PURGE_GRACE``, so that a late request is told "expired" rather than "unknown".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

__all__ = ["PURGE_EVERY", "PURGE_GRACE", "PurgeTimer"]

PURGE_GRACE = timedelta(hours=1)  # expired rows stay this long so the error says "expired"
PURGE_EVERY = 10.0  # seconds between purges of one table (per process)


class PurgeTimer:
    """``due()`` is True at most once per ``every`` seconds."""

    def __init__(self, every: float = PURGE_EVERY, clock: Callable[[], float] = time.monotonic):
        self._every = every
        self._clock = clock
        self._next = 0.0

    def due(self) -> bool:
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self._every
        return True

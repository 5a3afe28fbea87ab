"""In-process cache of the catalogue lookups on the attestation path, keyed by a label set.

``policies_for_labels`` and ``keys_for_labels`` read every policy / grant and filter them here:
the same work for every attestation of nodes with the same labels. ``LabelCache`` keeps the
result per label set, and never serves one older than the change feed allows:

- any catalogue write by this process drops every entry once committed (``clear``);
- writes by other processes (the operator CLI, other replicas) record a change row, so at most
  every ``CHECK_INTERVAL`` seconds the newest change id is read and, if it moved, every entry is
  dropped (the Watch push polls the same feed every 0.5 s);
- an entry is never served more than ``MAX_AGE`` seconds after the read that produced it began,
  which also bounds writes that record no change row (e.g. a grant no node matched yet).

A load racing with an invalidation is not stored (generation count). Values must be immutable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

__all__ = ["CHECK_INTERVAL", "MAX_AGE", "MAX_ENTRIES", "LabelCache"]

CHECK_INTERVAL = 0.2  # seconds between reads of the newest change id
MAX_AGE = 1.0  # seconds an entry may be served at most
MAX_ENTRIES = 1024  # distinct label sets; past that the cache starts over

LabelKey = tuple[tuple[str, str], ...]
V = TypeVar("V")


class LabelCache(Generic[V]):
    """Results of ``load()`` per label set; see the module docstring for when they are dropped."""

    def __init__(
        self, last_change_id: Callable[[], int], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._last_change_id = last_change_id
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[LabelKey, tuple[float, V]] = {}
        self._generation = 0
        self._change_id: int | None = None
        self._checked_at: float | None = None

    def get(self, labels: Mapping[str, str], load: Callable[[], V]) -> V:
        key = tuple(sorted(labels.items()))
        started = self._clock()
        self._revalidate(started)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and started - hit[0] < MAX_AGE:
                return hit[1]
            generation = self._generation
        value = load()
        with self._lock:
            if generation == self._generation:
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries.clear()
                self._entries[key] = (started, value)
        return value

    def clear(self) -> None:
        """Drop every entry (and re-read the change id on the next lookup)."""
        with self._lock:
            self._entries.clear()
            self._generation += 1
            self._checked_at = None

    def _revalidate(self, now: float) -> None:
        with self._lock:
            if self._checked_at is not None and now - self._checked_at < CHECK_INTERVAL:
                return
        current = self._last_change_id()  # outside the lock: a database read
        with self._lock:
            if current != self._change_id:
                self._entries.clear()
                self._generation += 1
                self._change_id = current
            self._checked_at = now

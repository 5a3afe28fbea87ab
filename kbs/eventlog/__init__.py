"""The boot event log as evidence in an attestation: ``verify_event_log`` parses the log (the
shared reading, ``keylease.eventlog``), checks that it replays to the quoted PCRs in every bank
both carry, and returns the boot state in each of those banks.

The reading depends only on the log's bytes, so ``EventLogCache`` keeps it by their SHA-256
(``CACHE_ENTRIES``): a node renewing its lease sends the same log every time, and nodes of one
model often do too; the check against the quoted values is redone on every call. The cache is
owned by the broker's context (``kbs.context.BrokerContext.event_logs``), one per process.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from kbs.errors import EventLogInvalid, EventLogMismatch
from keylease.eventlog import Analysis, EventLogError, analyse
from keylease.eventlog import EventLogInvalid as Malformed
from keylease.eventlog.bootstate import BootState

__all__ = ["CACHE_ENTRIES", "EventLogCache", "VerifiedLog", "verify_event_log"]

CACHE_ENTRIES = 512


@dataclass(frozen=True)
class VerifiedLog:
    digest: str  # SHA-256 of the log's bytes (hex)
    banks: tuple[str, ...]  # the banks checked against the quote
    states: Mapping[str, BootState]  # the boot state in each of them


class EventLogCache:
    """SHA-256 of the log -> its reading, least recently used out; holds no log bytes (a log
    can be 1 MiB). Thread-safe (on PostgreSQL attestations run in worker threads)."""

    def __init__(self, size: int = CACHE_ENTRIES) -> None:
        self._size = size
        self._entries: dict[bytes, Analysis] = {}
        self._lock = threading.Lock()

    def get(self, data: bytes) -> tuple[bytes, Analysis]:
        """The log's SHA-256 and reading; raises kbs.errors.EventLogInvalid."""
        key = hashlib.sha256(data).digest()
        with self._lock:
            found = self._entries.pop(key, None)
        if found is None:
            found = _analyse(data)  # outside the lock: it may take ms
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = found  # most recently used last
        return key, found

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _analyse(data: bytes) -> Analysis:
    try:
        return analyse(data)
    except Malformed as exc:
        raise EventLogInvalid(str(exc)) from None
    except EventLogError as exc:
        raise EventLogMismatch(str(exc)) from None


def _list(indices: list[int]) -> str:
    return ",".join(str(i) for i in indices)


def verify_event_log(
    cache: EventLogCache, data: bytes, quoted: Mapping[str, Mapping[int, bytes]]
) -> VerifiedLog:
    """Parse ``data`` (through ``cache``) and check it replays to ``quoted`` (bank -> PCR ->
    value, from a verified quote) in every bank both carry. Raises EventLogInvalid (malformed)
    or EventLogMismatch."""
    key, found = cache.get(data)
    common = tuple(b for b in found.banks if b in quoted)
    if not common:
        raise EventLogMismatch(
            f"the event log carries {', '.join(found.banks) or 'no usable'} digests but the quote "
            f"covers {', '.join(sorted(quoted))}: it cannot be checked against the quote"
        )
    for bank in common:
        replayed, values = found.replayed[bank], quoted[bank]
        unquoted = sorted(set(replayed) - set(values))
        if unquoted:
            raise EventLogMismatch(
                f"the event log extends PCR {_list(unquoted)} ({bank}), which the quote does "
                "not cover"
            )
        differing = sorted(i for i, value in replayed.items() if values[i] != value)
        if differing:
            raise EventLogMismatch(
                f"the boot event log does not replay to the quoted PCR {_list(differing)} "
                f"({bank}): the log was altered or belongs to another boot"
            )
    return VerifiedLog(key.hex(), common, {b: found.states[b] for b in common})

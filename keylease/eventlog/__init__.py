"""The boot event log, read the same way by the broker and the agent: parsed (``parse``), decoded
(``events``), replayed (``replay``), read as named components (``bootstate``, in words:
``summary``), and a component that is not allowed named in one wording (``wording``).

``analyse`` is the whole reading of one log: every bank it carries that can be replayed, the PCR
values it produces there and the boot state in each. Errors: ``errors.EventLogError`` and its
subclasses, which each program turns into its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from keylease.eventlog.bootstate import BootState, derive
from keylease.eventlog.errors import EventLogBankMissing, EventLogError, EventLogInvalid
from keylease.eventlog.parse import parse_event_log
from keylease.eventlog.replay import HASHES, replay

__all__ = [
    "Analysis",
    "EventLogBankMissing",
    "EventLogError",
    "EventLogInvalid",
    "analyse",
]


@dataclass(frozen=True)
class Analysis:
    banks: tuple[str, ...]  # every bank of the log that can be replayed (sha1/256/384/512)
    replayed: Mapping[str, Mapping[int, bytes]]  # bank -> PCR -> value the log produces
    states: Mapping[str, BootState]  # bank -> the boot state it shows


def analyse(data: bytes, banks: tuple[str, ...] | None = None) -> Analysis:
    """Parse ``data`` and read it in every bank it carries (or only those of ``banks`` it
    carries). Raises EventLogInvalid for a malformed log."""
    log = parse_event_log(data)
    usable = tuple(b for b in log.banks if b in HASHES and (banks is None or b in banks))
    replayed = {b: replay(log, b) for b in usable}
    return Analysis(usable, replayed, {b: derive(log, b, replayed[b]) for b in usable})

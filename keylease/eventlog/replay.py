"""Replaying a boot event log: the PCR values its events produce in one bank.

Events of type EV_NO_ACTION are not extended; a "StartupLocality" EV_NO_ACTION event sets PCR 0's
initial value (the locality the platform started in). The broker compares the result with the
quote (``kbs.eventlog.verify_event_log``), and replays predicted logs the same way (``extend``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from keylease.eventlog.errors import EventLogBankMissing
from keylease.eventlog.parse import EV_NO_ACTION, EventLog

__all__ = ["HASHES", "extend", "initial_values", "replay"]

STARTUP_LOCALITY = b"StartupLocality\x00"
HASHES = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}


def _hash(bank: str, log: EventLog | None = None) -> Callable[..., Any]:
    hash_fn = HASHES.get(bank)
    if hash_fn is None or (log is not None and bank not in log.banks):
        have = ", ".join(log.banks) if log is not None else "sha1, sha256, sha384, sha512"
        raise EventLogBankMissing(f"the event log carries no {bank} digests (it has {have})")
    return hash_fn


def initial_values(log: EventLog, bank: str) -> dict[int, bytes]:
    """PCR values set before any extend: PCR 0 from a StartupLocality event, if the log has one."""
    size = _hash(bank, log)().digest_size
    initial: dict[int, bytes] = {}
    for event in log.events:
        data = event.data
        locality = event.type == EV_NO_ACTION and event.pcr == 0 and len(data) > 16
        if locality and data.startswith(STARTUP_LOCALITY):
            initial[0] = bytes(size - 1) + data[16:17]
    return initial


def extend(
    bank: str, initial: Mapping[int, bytes], measured: Iterable[tuple[int, bytes]]
) -> dict[int, bytes]:
    """The PCR values after extending ``measured`` (PCR, digest) in order onto ``initial``."""
    hash_fn = _hash(bank)
    zero = bytes(hash_fn().digest_size)
    pcrs = dict(initial)
    for pcr, digest in measured:
        pcrs[pcr] = hash_fn(pcrs.get(pcr, zero) + digest).digest()
    return pcrs


def replay(log: EventLog, bank: str) -> dict[int, bytes]:
    """The PCR values the events produce in ``bank``, for every PCR the log extends."""
    initial = initial_values(log, bank)
    measured = ((e.pcr, e.digests[bank]) for e in log.events if e.type != EV_NO_ACTION)
    return extend(bank, initial, measured)

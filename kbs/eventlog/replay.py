"""Replaying a boot event log: the PCR values its events produce in one bank.

Events of type EV_NO_ACTION are not extended; a "StartupLocality" EV_NO_ACTION event sets PCR 0's
initial value (the locality the platform started in). ``kbs.eventlog.verify_event_log`` compares
the result with the quote.
"""

from __future__ import annotations

import hashlib

from kbs.errors import EventLogMismatch
from kbs.eventlog.parse import EV_NO_ACTION, EventLog

__all__ = ["HASHES", "replay"]

STARTUP_LOCALITY = b"StartupLocality\x00"
HASHES = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}


def replay(log: EventLog, bank: str) -> dict[int, bytes]:
    """The PCR values the events produce in ``bank``, for every PCR the log extends."""
    hash_fn = HASHES.get(bank)
    if hash_fn is None or bank not in log.banks:
        raise EventLogMismatch(
            f"the event log carries no {bank} digests (it has {', '.join(log.banks)})"
        )
    size = hash_fn().digest_size
    zero = bytes(size)
    pcrs: dict[int, bytes] = {}
    for event in log.events:
        if event.type == EV_NO_ACTION:
            data = event.data
            if event.pcr == 0 and data.startswith(STARTUP_LOCALITY) and len(data) > 16:
                pcrs[0] = zero[:-1] + data[16:17]
            continue
        pcrs[event.pcr] = hash_fn(pcrs.get(event.pcr, zero) + event.digests[bank]).digest()
    return pcrs

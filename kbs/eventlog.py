"""Boot event log replay: a TCG PC Client crypto-agile log must reproduce the quoted PCRs.

Format (TCG PC Client Platform Firmware Profile, section 10): one legacy ``TCG_PCR_EVENT`` holding
the "Spec ID Event03" header that lists the digest sizes, then ``TCG_PCR_EVENT2`` records. Events of
type EV_NO_ACTION are not extended; a "StartupLocality" EV_NO_ACTION event sets PCR 0's initial
value. Every PCR the log touches must replay to exactly the quoted value; structural garbage is an
``InvalidRequest``, a replay that differs an ``EventLogMismatch`` naming the PCR.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from kbs.errors import EventLogMismatch, InvalidRequest

__all__ = ["Event", "check_event_log", "parse_event_log", "replay"]

EV_NO_ACTION = 0x3
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY = b"StartupLocality\x00"
ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
MAX_EVENTS = 10_000
MAX_EVENT_DATA = 1 << 20
PCR_COUNT = 24


@dataclass(frozen=True)
class Event:
    pcr: int
    event_type: int
    digests: Mapping[int, bytes]  # algorithm id -> digest
    data: bytes


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InvalidRequest(f"event log is truncated in {what} at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


def _spec_header(r: _Reader) -> dict[int, int]:
    """The legacy first event; returns algorithm id -> digest size."""
    r.u32("first event PCR index")
    if r.u32("first event type") != EV_NO_ACTION:
        raise InvalidRequest("event log does not start with the Spec ID EV_NO_ACTION event")
    r.take(20, "first event digest")
    body = _Reader(r.take(r.u32("first event size"), "Spec ID event"))
    if body.take(16, "Spec ID signature") != SPEC_ID_SIGNATURE:
        raise InvalidRequest("event log is not crypto-agile (no 'Spec ID Event03' header)")
    body.take(8, "Spec ID platform class and version")
    count = body.u32("algorithm count")
    if not 0 < count <= 8:
        raise InvalidRequest(f"event log header lists {count} algorithms")
    sizes: dict[int, int] = {}
    for _ in range(count):
        alg = body.u16("algorithm id")
        size = body.u16("digest size")
        if not 0 < size <= 64:
            raise InvalidRequest(f"event log header gives digest size {size}")
        sizes[alg] = size
    body.take(body.u8("vendor info size"), "vendor info")
    return sizes


def parse_event_log(data: bytes) -> list[Event]:
    r = _Reader(data)
    sizes = _spec_header(r)
    events: list[Event] = []
    while not r.done:
        if len(events) >= MAX_EVENTS:
            raise InvalidRequest(f"event log has more than {MAX_EVENTS} events")
        pcr = r.u32("PCR index")
        event_type = r.u32("event type")
        count = r.u32("digest count")
        if count != len(sizes):
            raise InvalidRequest(
                f"event {len(events) + 1} has {count} digests, expected {len(sizes)}"
            )
        digests: dict[int, bytes] = {}
        for _ in range(count):
            alg = r.u16("digest algorithm")
            if alg not in sizes or alg in digests:
                raise InvalidRequest(
                    f"event {len(events) + 1} has an unexpected digest 0x{alg:04x}"
                )
            digests[alg] = r.take(sizes[alg], "digest")
        size = r.u32("event size")
        if size > MAX_EVENT_DATA:
            raise InvalidRequest(f"event {len(events) + 1} data is {size} bytes")
        if pcr >= PCR_COUNT and event_type != EV_NO_ACTION:
            raise InvalidRequest(f"event {len(events) + 1} extends PCR {pcr}, out of range")
        events.append(Event(pcr, event_type, digests, r.take(size, "event data")))
    return events


def replay(events: list[Event], bank: str) -> dict[int, bytes]:
    """The PCR values the events produce in ``bank``, for every PCR the log touches."""
    alg = ALG_IDS[bank]
    hash_fn = getattr(hashlib, bank)
    size = hash_fn().digest_size
    pcrs: dict[int, bytes] = {}
    for event in events:
        if event.event_type == EV_NO_ACTION:
            if event.pcr == 0 and event.data.startswith(STARTUP_LOCALITY) and len(event.data) > 16:
                pcrs[0] = bytes(size - 1) + event.data[16:17]
            continue
        digest = event.digests.get(alg)
        if digest is None:
            raise InvalidRequest(f"event log carries no {bank} digests")
        pcrs[event.pcr] = hash_fn(pcrs.get(event.pcr, bytes(size)) + digest).digest()
    return pcrs


def check_event_log(data: bytes, bank: str, quoted: Mapping[int, bytes]) -> None:
    """Raise unless every quoted PCR the log extends replays to exactly its quoted value."""
    if bank not in ALG_IDS:
        raise InvalidRequest(f"event log replay does not support bank {bank!r}")
    replayed = replay(parse_event_log(data), bank)
    unquoted = sorted(set(replayed) - set(quoted))
    if unquoted:
        raise EventLogMismatch(
            f"the event log extends PCR {','.join(map(str, unquoted))}, which the quote does "
            "not cover"
        )
    differing = sorted(i for i, value in replayed.items() if quoted[i] != value)
    if differing:
        raise EventLogMismatch(
            f"the boot event log does not replay to the quoted PCR "
            f"{','.join(map(str, differing))}: the log was altered or belongs to another boot"
        )

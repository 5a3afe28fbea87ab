"""Parsing a TCG PC Client boot event log into events (no interpretation of their data).

Two formats (TCG PC Client Platform Firmware Profile, section 10): the crypto-agile log (one
legacy ``TCG_PCR_EVENT`` holding the "Spec ID Event03" header that lists the digest algorithms and
sizes, then ``TCG_PCR_EVENT2`` records with one digest per algorithm), and the legacy SHA-1 log of
TCG 1.2 firmware (``TCG_PCR_EVENT`` records only). Structural garbage — a truncated record, a
digest count or algorithm the header does not announce, an event over the size limits, a PCR
index out of range — raises ``EventLogInvalid`` naming the event and byte offset; nothing here
raises anything else.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from keylease.eventlog.errors import EventLogInvalid

__all__ = [
    "ALG_NAMES",
    "EV_NO_ACTION",
    "MAX_EVENTS",
    "MAX_EVENT_DATA",
    "Event",
    "EventLog",
    "parse_event_log",
]

EV_NO_ACTION = 0x3
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
ALG_NAMES = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
MAX_EVENTS = 10_000  # real firmware logs hold tens to a few hundred; 1 MiB fits ~20,000 at most
MAX_EVENT_DATA = 1 << 20
PCR_COUNT = 24
_U32 = struct.Struct("<I")
_HEAD2 = struct.Struct("<III")  # PCR index, event type, digest count
_HEAD1 = struct.Struct("<II")  # PCR index, event type


@dataclass(frozen=True)
class Event:
    number: int  # 1-based position in the log (the Spec ID header is event 0)
    pcr: int
    type: int
    digests: Mapping[str, bytes]  # bank name ("sha256", or "alg-0x0012" if unknown) -> digest
    data: bytes


@dataclass(frozen=True)
class EventLog:
    banks: tuple[str, ...]  # the digest algorithms every event carries, in header order
    events: tuple[Event, ...]
    legacy: bool  # a TCG 1.2 SHA-1 log (no Spec ID Event03 header)


def _bank(alg: int) -> str:
    return ALG_NAMES.get(alg, f"alg-0x{alg:04x}")


def _truncated(what: str, pos: int) -> EventLogInvalid:
    return EventLogInvalid(f"the event log is truncated in {what} at byte {pos}")


def _take(data: bytes, pos: int, n: int, what: str) -> int:
    """The end of ``n`` bytes at ``pos``; EventLogInvalid if the log ends first."""
    end = pos + n
    if n < 0 or end > len(data):
        raise _truncated(what, pos)
    return end


def _spec_header(data: bytes) -> tuple[dict[int, int], int] | None:
    """(algorithm id -> digest size, offset after the header) of a crypto-agile log, None for a
    log whose first event is not the Spec ID Event03 header (a legacy log)."""
    end = _take(data, 0, 32, "the first event")
    pcr, etype = _HEAD1.unpack_from(data, 0)
    (size,) = _U32.unpack_from(data, 28)
    body_end = _take(data, end, size, "the first event's data")
    body = data[end:body_end]
    if etype != EV_NO_ACTION or not body.startswith(SPEC_ID_SIGNATURE):
        return None
    if pcr != 0:
        raise EventLogInvalid(f"the Spec ID header event is in PCR {pcr}, not 0")
    pos = 16 + 8  # signature, platformClass, version minor/major/errata, uintnSize
    if len(body) < pos + 4:
        raise _truncated("the Spec ID header", end)
    (count,) = _U32.unpack_from(body, pos)
    pos += 4
    if not 0 < count <= 8:
        raise EventLogInvalid(f"the event log header lists {count} digest algorithms")
    if len(body) < pos + 4 * count + 1:
        raise _truncated("the Spec ID algorithm list", end + pos)
    sizes: dict[int, int] = {}
    for _ in range(count):
        alg, digest_size = struct.unpack_from("<HH", body, pos)
        pos += 4
        if not 0 < digest_size <= 64 or alg in sizes:
            raise EventLogInvalid(
                f"the event log header lists algorithm 0x{alg:04x} with digest size "
                f"{digest_size} (or twice)"
            )
        sizes[alg] = digest_size
    if len(body) < pos + 1 + body[pos]:
        raise _truncated("the Spec ID vendor information", end + pos)
    return sizes, body_end


def _check_event(number: int, pcr: int, etype: int, size: int, at: int) -> None:
    if number > MAX_EVENTS:
        raise EventLogInvalid(f"the event log has more than {MAX_EVENTS} events")
    if size > MAX_EVENT_DATA:
        raise EventLogInvalid(f"event {number} (byte {at}) carries {size} bytes of data")
    if pcr >= PCR_COUNT and etype != EV_NO_ACTION:
        raise EventLogInvalid(f"event {number} (byte {at}) extends PCR {pcr}, out of range 0-23")


def _agile_events(data: bytes, sizes: dict[int, int], pos: int) -> list[Event]:
    names = {alg: _bank(alg) for alg in sizes}
    expected = len(sizes)
    # Every real log writes each event's digests in the header's order: one unpack per event
    # (the fast path); any other order goes through the checks of ``_digests``.
    fast = struct.Struct("<III" + "".join(f"H{size}s" for size in sizes.values()) + "I")
    order = tuple(sizes)
    bank_names = tuple(names[alg] for alg in order)
    events: list[Event] = []
    end_of_log = len(data)
    while pos < end_of_log:
        number = len(events) + 1
        at = pos
        if at + fast.size <= end_of_log:
            fields = fast.unpack_from(data, at)
            pcr, etype, count = fields[0], fields[1], fields[2]
            if count == expected and fields[3:-1:2] == order:
                size, pos = fields[-1], at + fast.size
                end = pos + size
                if end > end_of_log:
                    raise _truncated(f"event {number}'s data", pos)
                _check_event(number, pcr, etype, size, at)
                digests = dict(zip(bank_names, fields[4:-1:2], strict=True))
                events.append(Event(number, pcr, etype, digests, data[pos:end]))
                pos = end
                continue
        pos = _take(data, at, 12, f"event {number}'s header")
        pcr, etype, count = _HEAD2.unpack_from(data, at)
        if count != expected:
            raise EventLogInvalid(
                f"event {number} (byte {at}) carries {count} digests; the header announces "
                f"{expected}"
            )
        digests, pos = _digests(data, pos, count, sizes, names, number, at)
        size_end = _take(data, pos, 4, f"event {number}'s data size")
        (size,) = _U32.unpack_from(data, pos)
        _check_event(number, pcr, etype, size, at)
        pos = _take(data, size_end, size, f"event {number}'s data")
        events.append(Event(number, pcr, etype, digests, data[size_end:pos]))
    return events


def _digests(
    data: bytes, pos: int, count: int, sizes: dict[int, int], names: dict[int, str],
    number: int, at: int,
) -> tuple[dict[str, bytes], int]:  # fmt: skip
    """The digests of one event in any order; each announced algorithm once."""
    digests: dict[str, bytes] = {}
    for _ in range(count):
        alg_end = _take(data, pos, 2, f"event {number}'s digest algorithm")
        alg = data[pos] | data[pos + 1] << 8
        size = sizes.get(alg)
        name = names.get(alg)
        if size is None or name is None or name in digests:
            raise EventLogInvalid(
                f"event {number} (byte {at}) carries a digest of algorithm 0x{alg:04x}, "
                "which the header does not announce (or twice)"
            )
        pos = _take(data, alg_end, size, f"event {number}'s digest")
        digests[name] = data[alg_end:pos]
    return digests, pos


def _legacy_events(data: bytes) -> list[Event]:
    events: list[Event] = []
    pos = 0
    while pos < len(data):
        number = len(events) + 1
        at = pos
        pos = _take(data, at, 32, f"event {number}'s header")
        pcr, etype = _HEAD1.unpack_from(data, at)
        (size,) = _U32.unpack_from(data, at + 28)
        _check_event(number, pcr, etype, size, at)
        pos = _take(data, pos, size, f"event {number}'s data")
        events.append(
            Event(number, pcr, etype, {"sha1": data[at + 8 : at + 28]}, data[at + 32 : pos])
        )
    return events


def parse_event_log(data: bytes) -> EventLog:
    """The events of a crypto-agile or legacy SHA-1 log; EventLogInvalid for anything else."""
    if not data:
        raise EventLogInvalid("the event log is empty")
    header = _spec_header(data)
    if header is None:
        return EventLog(("sha1",), tuple(_legacy_events(data)), legacy=True)
    sizes, pos = header
    banks = tuple(_bank(alg) for alg in sizes)
    return EventLog(banks, tuple(_agile_events(data, sizes, pos)), legacy=False)

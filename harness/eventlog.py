"""Synthetic TCG PC Client crypto-agile boot event logs (sha1 + sha256 digests), for tests.

Each event's digests are the hashes of its data, so extending the TPM's sha256 PCR with
SHA-256(data) — ``Tpm.extend_pcr(index, data)`` — makes the TPM agree with the log.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

__all__ = ["EV_NO_ACTION", "EV_SEPARATOR", "build_event_log"]

EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
ALGS = ((0x0004, hashlib.sha1), (0x000B, hashlib.sha256))


def _spec_id_event() -> bytes:
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(ALGS))
    for alg, fn in ALGS:
        body += struct.pack("<HH", alg, fn().digest_size)
    body += b"\x00"  # no vendor info
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def _event2(pcr: int, event_type: int, data: bytes) -> bytes:
    out = struct.pack("<III", pcr, event_type, len(ALGS))
    for alg, fn in ALGS:
        digest = bytes(fn().digest_size) if event_type == EV_NO_ACTION else fn(data).digest()
        out += struct.pack("<H", alg) + digest
    return out + struct.pack("<I", len(data)) + data


def build_event_log(events: Sequence[tuple[int, bytes]], *, event_type: int = 0xD) -> bytes:
    """A log of ``(pcr, data)`` events (type EV_IPL by default), after the Spec ID header."""
    return _spec_id_event() + b"".join(_event2(pcr, event_type, data) for pcr, data in events)

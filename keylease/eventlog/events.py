"""What the data of each kind of boot event says (TCG PC Client PFP 10.4, UEFI 2.10).

Decoders never raise: event data comes from the node, and data a decoder cannot read is shown as
such ("undecodable ...") rather than refused — the digest, which the replay verified, is what a
policy compares. Every string taken from event data is escaped (``printable``) before it can reach
a log line, an audit record or an operator's terminal.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass

from cryptography import x509

from keylease.certificates import MALFORMED

__all__ = [
    "EFI_CERT_SHA256",
    "EFI_CERT_X509",
    "EVENT_TYPES",
    "ImageLoad",
    "SignatureEntry",
    "Variable",
    "event_name",
    "image_load",
    "printable",
    "signature_data",
    "signature_lists",
    "tagged_event",
    "text",
    "variable",
]

EVENT_TYPES = {
    0x0: "EV_PREBOOT_CERT",
    0x1: "EV_POST_CODE",
    0x3: "EV_NO_ACTION",
    0x4: "EV_SEPARATOR",
    0x5: "EV_ACTION",
    0x6: "EV_EVENT_TAG",
    0x7: "EV_S_CRTM_CONTENTS",
    0x8: "EV_S_CRTM_VERSION",
    0x9: "EV_CPU_MICROCODE",
    0xA: "EV_PLATFORM_CONFIG_FLAGS",
    0xB: "EV_TABLE_OF_DEVICES",
    0xC: "EV_COMPACT_HASH",
    0xD: "EV_IPL",
    0xE: "EV_IPL_PARTITION_DATA",
    0xF: "EV_NONHOST_CODE",
    0x10: "EV_NONHOST_CONFIG",
    0x11: "EV_NONHOST_INFO",
    0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}
EFI_CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
EFI_CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
MAX_TEXT = 120


def event_name(event_type: int) -> str:
    """``EV_EFI_ACTION``; an unknown type as ``unknown event type 0x...``."""
    return EVENT_TYPES.get(event_type, f"unknown event type 0x{event_type:08x}")


def printable(value: str, limit: int = MAX_TEXT) -> str:
    """``value`` with every non-printable character escaped, cut to ``limit`` characters."""
    if value.isprintable():
        return value[:limit] + ("…" if len(value) > limit else "")
    out = "".join(c if c.isprintable() else f"\\x{ord(c) & 0xFF:02x}" for c in value[:limit])
    return out + ("…" if len(value) > limit else "")


def text(data: bytes) -> str:
    """Event data meant as text (EV_EFI_ACTION, EV_IPL, a CRTM version): ASCII/UTF-8 or UTF-16LE,
    trailing NULs dropped, escaped."""
    if len(data) >= 2 and data[1::2].count(0) == len(data) // 2 and any(data[0::2]):
        decoded = data.decode("utf-16-le", errors="replace")
    else:
        decoded = data.decode("utf-8", errors="replace")
    return printable(decoded.rstrip("\x00"))


@dataclass(frozen=True)
class Variable:
    """UEFI_VARIABLE_DATA: a variable's vendor GUID, name and value."""

    guid: uuid.UUID
    name: str  # escaped
    data: bytes


def variable(data: bytes) -> Variable | None:
    """The UEFI_VARIABLE_DATA in ``data``; None if it does not hold exactly one."""
    if len(data) < 32:
        return None
    name_chars, value_size = struct.unpack_from("<QQ", data, 16)
    end_name = 32 + 2 * name_chars
    if name_chars > 1024 or end_name + value_size != len(data):
        return None
    name = data[32:end_name].decode("utf-16-le", errors="replace").rstrip("\x00")
    return Variable(uuid.UUID(bytes_le=data[:16]), printable(name, 64), data[end_name:])


@dataclass(frozen=True)
class SignatureEntry:
    """One EFI_SIGNATURE_DATA: ``id`` is the hash itself for a SHA-256 entry (as dbx updates list
    them), else SHA-256 of the entry's data (e.g. a certificate's DER)."""

    kind: str  # "sha256", "x509" or the signature type GUID
    id: str  # 64 hex digits
    subject: str  # an X.509 entry's subject (escaped), else ""


def _entry(kind: uuid.UUID, data: bytes) -> SignatureEntry:
    if kind == EFI_CERT_SHA256 and len(data) == 32:
        return SignatureEntry("sha256", data.hex(), "")
    if kind == EFI_CERT_X509:
        return SignatureEntry("x509", hashlib.sha256(data).hexdigest(), _subject(data))
    return SignatureEntry(str(kind), hashlib.sha256(data).hexdigest(), "")


def _subject(der: bytes) -> str:
    try:
        return printable(x509.load_der_x509_certificate(der).subject.rfc4514_string(), 80)
    except MALFORMED:
        return "undecodable certificate"


def signature_lists(data: bytes) -> tuple[SignatureEntry, ...] | None:
    """The entries of a sequence of EFI_SIGNATURE_LISTs (PK, KEK, db, dbx); None if malformed."""
    entries: list[SignatureEntry] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 28:
            return None
        kind = uuid.UUID(bytes_le=data[pos : pos + 16])
        list_size, header_size, entry_size = struct.unpack_from("<III", data, pos + 16)
        end = pos + list_size
        start = pos + 28 + header_size
        if list_size < 28 or end > len(data) or entry_size <= 16 or start > end:
            return None
        if (end - start) % entry_size:
            return None
        for at in range(start, end, entry_size):
            entries.append(_entry(kind, data[at + 16 : at + entry_size]))  # past the owner GUID
        pos = end
    return tuple(entries)


def signature_data(data: bytes) -> SignatureEntry | None:
    """One EFI_SIGNATURE_DATA (owner GUID, then the certificate), as EV_EFI_VARIABLE_AUTHORITY
    events hold it; None if it is too short."""
    if len(data) <= 16:
        return None
    body = data[16:]
    kind = EFI_CERT_X509 if body[:1] == b"\x30" else EFI_CERT_SHA256
    return _entry(kind, body)


@dataclass(frozen=True)
class ImageLoad:
    """UEFI_IMAGE_LOAD_EVENT: where the image was loaded and the file path of its device path."""

    length: int
    path: str  # escaped; "" when the device path names no file


def image_load(data: bytes) -> ImageLoad | None:
    if len(data) < 32:
        return None
    _location, length, _link, path_size = struct.unpack_from("<QQQQ", data, 0)
    if 32 + path_size != len(data):
        return None
    return ImageLoad(length, _file_path(data[32:]))


def _file_path(device_path: bytes) -> str:
    """The file path nodes (type 4, subtype 4) of a UEFI device path, joined."""
    parts: list[str] = []
    pos = 0
    while pos + 4 <= len(device_path):
        node_type, subtype, size = struct.unpack_from("<BBH", device_path, pos)
        if size < 4 or pos + size > len(device_path) or node_type == 0x7F:
            break
        if node_type == 4 and subtype == 4:
            parts.append(
                device_path[pos + 4 : pos + size].decode("utf-16-le", "replace").rstrip("\x00")
            )
        pos += size
    return printable("".join(parts), 160)


LINUX_TAGS = {0x8F3B22ED: "kernel command line", 0x8F3B22EC: "initrd"}


def tagged_event(data: bytes) -> tuple[int, str] | None:
    """TCG_PCClientTaggedEvent: (tag id, the text it carries); None if malformed."""
    if len(data) < 8:
        return None
    tag, size = struct.unpack_from("<II", data, 0)
    if 8 + size != len(data):
        return None
    return tag, text(data[8:])

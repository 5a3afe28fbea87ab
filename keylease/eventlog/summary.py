"""What a component is, in words: the ``summary`` ``keylease.eventlog.bootstate`` gives each one
(paths, variable names, certificate subjects, CRTM versions). Node-supplied text, escaped
(``keylease.eventlog.events``); never compared by a policy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import keylease.eventlog.events as ev
from keylease.eventlog.parse import Event

__all__ = [
    "EV_APPLICATION",
    "EV_AUTHORITY",
    "EV_BLOB",
    "EV_BLOB2",
    "EV_DRIVER_CONFIG",
    "EV_EFI_ACTION",
    "EV_EVENT_TAG",
    "EV_IPL",
    "EV_SEPARATOR",
    "EV_S_CRTM_VERSION",
    "EV_VARIABLE_BOOT",
    "EV_VARIABLE_BOOT2",
    "app",
    "boot_variables",
    "describe",
    "entries",
    "firmware",
    "short",
]

EV_SEPARATOR, EV_EFI_ACTION, EV_IPL, EV_EVENT_TAG = 0x4, 0x80000007, 0xD, 0x6
EV_S_CRTM_VERSION, EV_DRIVER_CONFIG, EV_AUTHORITY = 0x8, 0x80000001, 0x800000E0
EV_APPLICATION, EV_BLOB, EV_BLOB2 = 0x80000003, 0x80000008, 0x8000000A
EV_VARIABLE_BOOT, EV_VARIABLE_BOOT2 = 0x80000002, 0x8000000C


def short(digest: bytes) -> str:
    return digest.hex()[:8] + "…"


def describe(event: Event) -> str:
    """One event in words, for summaries."""
    name = ev.event_name(event.type)
    if event.type in (EV_EFI_ACTION, 0x5, EV_IPL):
        return f"{name} '{ev.text(event.data)}'"
    if event.type in (EV_DRIVER_CONFIG, EV_AUTHORITY, EV_VARIABLE_BOOT, EV_VARIABLE_BOOT2):
        var = ev.variable(event.data)
        return f"{name} {var.name if var else '(undecodable)'}"
    return name


def firmware(events: Sequence[Event], value: bytes, bank: str) -> str:
    crtm = [ev.text(e.data) for e in events if e.type == EV_S_CRTM_VERSION]
    blobs = [short(e.digests[bank]) for e in events if e.type in (EV_BLOB, EV_BLOB2)]
    known = (EV_S_CRTM_VERSION, EV_BLOB, EV_BLOB2, EV_SEPARATOR)
    other = sorted({ev.event_name(e.type) for e in events if e.type not in known})
    parts = [f"CRTM version '{crtm[0]}'" if crtm else "no CRTM version"]
    parts.append(f"{len(blobs)} firmware blob(s)" + (f" {', '.join(blobs[:4])}" if blobs else ""))
    if other:
        parts.append("also " + ", ".join(other))
    return "; ".join(parts) + f" (PCR 0 {short(value)})"


def boot_variables(events: Sequence[Event], value: bytes) -> str:
    names: list[str] = []
    for e in events:
        if len(names) > 8:
            names.append("")  # counted, not decoded
            continue
        var = ev.variable(e.data) if e.type != EV_SEPARATOR else None
        if var is not None:
            names.append(
                var.name
                + (
                    f" ({_load_option(var.data)})"
                    if var.name[:4] == "Boot" and var.name != "BootOrder"
                    else ""
                )
            )
        elif e.type != EV_SEPARATOR:
            names.append(ev.event_name(e.type))
    more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
    return (", ".join(names[:8]) or "no variables") + more + f" (PCR 1 {short(value)})"


def _load_option(data: bytes) -> str:
    """The description of an EFI_LOAD_OPTION (Boot####)."""
    end = 6
    while end + 1 < len(data) and data[end : end + 2] != b"\x00\x00":
        end += 2
    return ev.printable(data[6:end].decode("utf-16-le", "replace"), 40)


def app(event: Event) -> str:
    if event.type == EV_APPLICATION:
        image = ev.image_load(event.data)
        if image is None:
            return "undecodable image load event"
        return image.path or "no file path"
    return describe(event)


def entries(found: Iterable[ev.SignatureEntry]) -> str:
    items = list(found)
    if not items:
        return "empty"
    certs = [e.subject or e.id[:8] for e in items if e.kind == "x509"]
    hashes = sum(1 for e in items if e.kind == "sha256")
    other = len(items) - len(certs) - hashes
    parts = [f"x509 {c}" for c in certs[:3]] + (
        [f"{len(certs) - 3} more x509"] if len(certs) > 3 else []
    )
    parts += [f"{hashes} sha256 hash(es)"] if hashes else []
    parts += [f"{other} other"] if other else []
    return f"{len(items)} entr{'y' if len(items) == 1 else 'ies'}: " + ", ".join(parts)

"""How a component that is not allowed is named, in one wording for the broker and the agent.

The broker's denial (``kbs.policy.evaluate``) and the agent's "no approved state matches" at
restore (``agent.approvals``) both say, e.g.::

    PCR 4, boot application 3 [boot-app.3] (\\EFI\\debian\\vmlinuz-6.1.0-28-amd64): digest
    2b690a…c0 is not allowed by policy prod-boot (allowed: \\EFI\\debian\\vmlinuz-6.1.0-27-amd64
    4c5a3c…78)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from keylease.eventlog.bootstate import component_pcrs

__all__ = [
    "ABSENT",
    "MAX_ALLOWED_SHOWN",
    "allowed_text",
    "component_label",
    "not_allowed",
    "short_value",
    "where",
]

ABSENT = "absent"
MAX_ALLOWED_SHOWN = 4
_HEX = re.compile(r"[0-9a-f]+")
_LABELS = {
    "firmware": "firmware",
    "boot-variables": "boot variables",
    "secure-boot": "Secure Boot",
    "pk": "PK",
    "kek": "KEK",
    "db": "db",
    "dbx": "dbx",
    "authorities": "Secure Boot authorities",
    "sb-config": "other Secure Boot configuration",
    "kernel-cmdline": "kernel command line",
    "initrd": "initrd",
    "bootloader-config": "bootloader configuration",
}


def component_label(component: str) -> str:
    """``boot-app.3`` -> "boot application 3", ``pcr.10`` -> "PCR 10 value", ``db`` -> "db"."""
    kind, _, n = component.partition(".")
    if kind == "boot-app":
        return f"boot application {n}"
    if kind == "pcr":
        return f"PCR {n} value"
    return _LABELS.get(component, component)


def short_value(value: str) -> str:
    """A digest as ``9f2c1a…e1``; other values as they are."""
    return f"{value[:6]}…{value[-2:]}" if len(value) > 12 and _HEX.fullmatch(value) else value


def _where(component: str, summary: str | None) -> str:
    pcrs = ",".join(map(str, component_pcrs(component)))
    if component.startswith("pcr."):
        return f"PCR {pcrs} [{component}]"
    where = f"PCR {pcrs}, {component_label(component)} [{component}]"
    return where + (f" ({summary})" if summary is not None else "")


def _seen(component: str, value: str | None) -> str:
    if value is None or value == ABSENT:
        return "absent"
    if component == "secure-boot":
        return f"state {value}"
    return f"{'value' if component.startswith('pcr.') else 'digest'} {short_value(value)}"


def allowed_text(allowed: Sequence[tuple[str, str]], more: Sequence[str] = ()) -> str:
    """``(note, value)`` pairs as "note-head value, ..." (the first few), then ``more``."""
    shown = []
    for note, value in allowed[:MAX_ALLOWED_SHOWN]:
        head = note.split(";")[0].strip()[:48]
        shown.append(f"{head} {short_value(value)}".strip())
    if len(allowed) > MAX_ALLOWED_SHOWN:
        shown.append(f"{len(allowed) - MAX_ALLOWED_SHOWN} more")
    return ", ".join([*shown, *more])


def not_allowed(
    component: str,
    summary: str | None,
    value: str | None,
    policy: str,
    allowed: Sequence[tuple[str, str]],
    more: Sequence[str] = (),
) -> str:
    """ "PCR 4, boot application 3 [boot-app.3] (summary): digest 9f2c1a…e1 is not allowed by
    policy P (allowed: ...)". ``summary``/``value`` None: the node does not show the component."""
    return (
        f"{_where(component, summary)}: {_seen(component, value)} is not allowed by policy "
        f"{policy} (allowed: {allowed_text(allowed, more)})"
    )


def where(component: str, summary: str | None) -> str:
    """ "PCR 4, boot application 3 [boot-app.3] (summary)": the start of every such line."""
    return _where(component, summary)

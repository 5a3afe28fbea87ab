"""The named boot state a replayed event log shows: components an operator can read and type.

Every event of PCRs 0, 1, 4, 7, 8 and 9 belongs to one component; other PCRs are raw values
(``pcr.N``, taken from the quote). A component's ``value`` is what a policy compares: a digest in
the bank of the derivation (the replay verified it), or ``on``/``off`` for Secure Boot (read from
the SecureBoot variable, whose data must hash to its measured digest). ``summary`` says what it
is in words (paths, variable names, certificate subjects: node-supplied text, escaped).

=====================  =====  =========================================================
component              PCR    events
=====================  =====  =========================================================
``firmware``           0      all (CRTM version, firmware blobs); value: PCR 0
``boot-variables``     1      all (BootOrder, Boot####, configuration); value: PCR 1
``boot-app.N``         4      the N-th image loaded (shim, bootloader, kernel), in order;
                              EV_EFI_ACTION and separators are not compared
``secure-boot``        7      the SecureBoot variable: on / off
``pk`` ``kek`` ``db``  7      the variable's contents (entries listed; ``contains`` rules)
``dbx``
``authorities``        7      EV_EFI_VARIABLE_AUTHORITY: what verified each image, in order
``sb-config``          7      any other PCR 7 event (debug mode, SbatLevel, ...)
``kernel-cmdline``     8, 9   the EFI stub's load options / GRUB's ``kernel_cmdline``
``initrd``             9      the EFI stub's initrd / GRUB's initrd file
``bootloader-config``  8, 9   every other GRUB command and file
``pcr.N``              N      the quoted value (any PCR)
=====================  =====  =========================================================

``BootState.layout`` keeps, in log order, every extended event's PCR, component and digest (the
bank's), and ``initial`` the PCR values set before any extend: enough to replay the log with one
component's events replaced by another's, which is how the broker predicts the PCR values of an
approved update (``kbs.approvals.predict``). The agent derives its own boot state the same way to
name the component that differs from every approved state (``agent.approvals``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import keylease.eventlog.events as ev
import keylease.eventlog.summary as words
from keylease.eventlog.parse import EV_NO_ACTION, Event, EventLog
from keylease.eventlog.replay import HASHES, initial_values
from keylease.eventlog.summary import (
    EV_AUTHORITY,
    EV_DRIVER_CONFIG,
    EV_EFI_ACTION,
    EV_EVENT_TAG,
    EV_IPL,
    EV_SEPARATOR,
)

__all__ = [
    "COMPONENT_GROUPS",
    "BootState",
    "Component",
    "Measured",
    "component_pcrs",
    "derive",
    "is_component_name",
]

SB_VARIABLES = {"PK": "pk", "KEK": "kek", "db": "db", "dbx": "dbx"}
# The components each decomposed PCR is made of, in display order; ``boot-app`` is a family.
COMPONENT_GROUPS: dict[tuple[int, ...], tuple[str, ...]] = {
    (0,): ("firmware",),
    (1,): ("boot-variables",),
    (4,): ("boot-app",),
    (7,): ("secure-boot", "pk", "kek", "db", "dbx", "authorities", "sb-config"),
    (8, 9): ("kernel-cmdline", "initrd", "bootloader-config"),
}
_PCRS = {name: pcrs for pcrs, names in COMPONENT_GROUPS.items() for name in names}
_INDEXED = re.compile(r"(boot-app|pcr)\.(\d{1,2})")
MAX_BOOT_APPS = 64
WHOLE_PCR = {"firmware": 0, "boot-variables": 1}  # components whose value is their PCR's value


def component_pcrs(name: str) -> tuple[int, ...]:
    """The PCRs component ``name`` is measured into (``name`` must be valid)."""
    found = _INDEXED.fullmatch(name)
    if found:
        return (int(found.group(2)),) if found.group(1) == "pcr" else (4,)
    return _PCRS[name]


def is_component_name(name: str) -> bool:
    found = _INDEXED.fullmatch(name)
    if found:
        n = int(found.group(2))
        return 0 <= n <= 23 if found.group(1) == "pcr" else 1 <= n <= MAX_BOOT_APPS
    return name in _PCRS and name != "boot-app"


@dataclass(frozen=True)
class Component:
    name: str
    pcrs: tuple[int, ...]
    value: str  # what policies compare: hex digest, "on"/"off", or "unverified"
    summary: str
    entries: tuple[str, ...] = ()  # pk/kek/db/dbx entry ids, when the data matched its digest


@dataclass(frozen=True)
class Measured:
    """One extended event: its PCR, the component it belongs to ("" for the actions and
    separators no component compares; ``pcr.N`` for PCRs not read as components) and digest."""

    pcr: int
    component: str
    digest: bytes


@dataclass(frozen=True)
class BootState:
    """The components an event log shows in one bank, the PCRs the log extends, and (since
    issue 11) its layout. States recorded before have no layout: nothing is predicted from them."""

    bank: str
    components: tuple[Component, ...]
    touched: tuple[int, ...]
    layout: tuple[Measured, ...] = ()
    initial: Mapping[int, bytes] = field(default_factory=dict)

    def get(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    def to_doc(self) -> dict[str, object]:
        return {
            "bank": self.bank,
            "touched": list(self.touched),
            "components": [
                {
                    "name": c.name,
                    "pcrs": list(c.pcrs),
                    "value": c.value,
                    "summary": c.summary,
                    "entries": list(c.entries),
                }
                for c in self.components
            ],
            "layout": [[m.pcr, m.component, m.digest.hex()] for m in self.layout],
            "initial": {str(i): v.hex() for i, v in sorted(self.initial.items())},
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, object]) -> BootState:
        """The inverse of ``to_doc`` (for documents this broker wrote; KeyError/TypeError/
        ValueError on anything else, which the store translates)."""
        raw = doc["components"]
        touched = doc["touched"]
        layout = doc.get("layout", [])
        initial = doc.get("initial", {})
        if not isinstance(raw, list) or not isinstance(touched, list):
            raise TypeError("a boot state document needs lists")
        if not isinstance(layout, list) or not isinstance(initial, dict):
            raise TypeError("a boot state's layout is a list, its initial values a map")
        return cls(
            str(doc["bank"]),
            tuple(
                Component(
                    str(c["name"]),
                    tuple(int(p) for p in c["pcrs"]),
                    str(c["value"]),
                    str(c["summary"]),
                    tuple(str(e) for e in c["entries"]),
                )
                for c in raw
            ),
            tuple(int(p) for p in touched),
            tuple(Measured(int(p), str(c), bytes.fromhex(d)) for p, c, d in layout),
            {int(i): bytes.fromhex(str(v)) for i, v in initial.items()},
        )


class _Deriver:
    def __init__(self, bank: str) -> None:
        self.bank = bank
        self.hash = HASHES[bank]
        self.owner: dict[int, str] = {}  # event number -> component

    def own(self, name: str, events: Sequence[Event]) -> None:
        for e in events:
            self.owner[e.number] = name

    def chain(self, events: Sequence[Event]) -> str:
        """One event: its digest; several: the bank's hash over their digests, in order."""
        if len(events) == 1:
            return events[0].digests[self.bank].hex()
        return self.hash(b"".join(e.digests[self.bank] for e in events)).hexdigest()

    def data_verified(self, event: Event, *alternatives: bytes) -> bool:
        """The event's data (or one of ``alternatives``) hashes to its measured digest."""
        digest = event.digests[self.bank]
        return any(self.hash(d).digest() == digest for d in (event.data, *alternatives))


class _Pcr7:
    def __init__(self, d: _Deriver) -> None:
        self.d = d
        self.named: dict[str, list[Event]] = {}
        self.authorities: list[Event] = []
        self.other: list[Event] = []

    def add(self, event: Event) -> None:
        var = ev.variable(event.data)
        if event.type == EV_DRIVER_CONFIG and var is not None:
            if var.name == "SecureBoot":
                self.named.setdefault("secure-boot", []).append(event)
                return
            if var.name in SB_VARIABLES:
                self.named.setdefault(SB_VARIABLES[var.name], []).append(event)
                return
        if event.type == EV_AUTHORITY:
            self.authorities.append(event)
        elif event.type != EV_SEPARATOR:
            self.other.append(event)

    def components(self) -> list[Component]:
        out = []
        for name, events in self.named.items():
            self.d.own(name, events)
        self.d.own("authorities", self.authorities)
        self.d.own("sb-config", self.other)
        for name in COMPONENT_GROUPS[(7,)]:
            found = self.named.get(name, [])
            if name == "secure-boot" and found:
                out.append(self._secure_boot(found))
            elif name in SB_VARIABLES.values() and found:
                out.append(self._variable(name, found))
            elif name == "authorities" and self.authorities:
                out.append(self._authorities())
            elif name == "sb-config" and self.other:
                text = ", ".join(words.describe(e) for e in self.other[:6])
                out.append(Component(name, (7,), self.d.chain(self.other), text))
        return out

    def _secure_boot(self, events: list[Event]) -> Component:
        last = events[-1]
        var = ev.variable(last.data)
        if var is None or len(events) > 1 or not self.d.data_verified(last):
            return Component(
                "secure-boot",
                (7,),
                "unverified",
                "SecureBoot variable data does not match its measurement",
            )
        state = "on" if var.data[:1] == b"\x01" else "off"
        return Component("secure-boot", (7,), state, f"Secure Boot {state}")

    def _variable(self, name: str, events: list[Event]) -> Component:
        value = self.d.chain(events)
        var = ev.variable(events[-1].data)
        entries = ev.signature_lists(var.data) if var is not None else None
        if len(events) > 1 or entries is None or not self.d.data_verified(events[-1]):
            return Component(name, (7,), value, "contents do not match the measurement")
        return Component(name, (7,), value, words.entries(entries), tuple(e.id for e in entries))

    def _authorities(self) -> Component:
        names = []
        for e in self.authorities:
            var = ev.variable(e.data)
            entry = ev.signature_data(var.data) if var is not None else None
            who = (entry.subject or entry.id[:8]) if entry else "undecodable"
            names.append(f"{var.name if var else '?'}: {who}")
        return Component("authorities", (7,), self.d.chain(self.authorities), "; ".join(names[:6]))


def _loader(d: _Deriver, events: Sequence[Event]) -> list[Component]:
    """PCR 8/9: kernel command line, initrd, everything else the bootloader measured."""
    groups: dict[str, list[Event]] = {"kernel-cmdline": [], "initrd": [], "bootloader-config": []}
    texts: dict[str, list[str]] = {k: [] for k in groups}
    for e in events:  # text is decoded for the first few of each group only (summaries)
        if e.type == EV_SEPARATOR:
            continue
        tagged = ev.tagged_event(e.data) if e.type == EV_EVENT_TAG else None
        ipl = e.type == EV_IPL
        if tagged is not None and tagged[0] in ev.LINUX_TAGS:
            key = "kernel-cmdline" if tagged[0] == 0x8F3B22ED else "initrd"
            text = f"EFI stub {ev.LINUX_TAGS[tagged[0]]} {words.short(e.digests[d.bank])}"
        elif ipl and e.data.startswith(b"kernel_cmdline:"):
            key = "kernel-cmdline"
            text = "" if len(texts[key]) > 4 else ev.text(e.data[15:]).strip()
        elif ipl and e.pcr == 9 and b"initrd" in e.data:
            key = "initrd"
            text = "" if len(texts[key]) > 4 else ev.text(e.data)
        else:
            key = "bootloader-config"
            text = "" if len(texts[key]) > 4 else words.describe(e)
        groups[key].append(e)
        texts[key].append(text)
    for name, found in groups.items():
        d.own(name, found)
    return [
        Component(
            name,
            (8, 9),
            d.chain(found),
            "; ".join(texts[name][:4]) + (f" (+{len(found) - 4} more)" if len(found) > 4 else ""),
        )
        for name, found in groups.items()
        if found
    ]


def derive(log: EventLog, bank: str, replayed: Mapping[int, bytes]) -> BootState:
    """The components ``log`` shows in ``bank`` (``replayed``: its PCR values in that bank)."""
    d = _Deriver(bank)
    by_pcr: dict[int, list[Event]] = {}
    for event in log.events:
        if event.type != EV_NO_ACTION:
            by_pcr.setdefault(event.pcr, []).append(event)
    out: list[Component] = []
    if 0 in by_pcr:
        d.own("firmware", by_pcr[0])
        summary = words.firmware(by_pcr[0], replayed[0], bank)
        out.append(Component("firmware", (0,), replayed[0].hex(), summary))
    if 1 in by_pcr:
        d.own("boot-variables", by_pcr[1])
        summary = words.boot_variables(by_pcr[1], replayed[1])
        out.append(Component("boot-variables", (1,), replayed[1].hex(), summary))
    apps = [e for e in by_pcr.get(4, []) if e.type not in (EV_EFI_ACTION, EV_SEPARATOR)]
    for n, e in enumerate(apps, 1):  # past MAX_BOOT_APPS no policy can name them: denied
        d.own(f"boot-app.{n}", [e])
        out.append(Component(f"boot-app.{n}", (4,), e.digests[bank].hex(), words.app(e)))
    if 7 in by_pcr:
        pcr7 = _Pcr7(d)
        for e in by_pcr[7]:
            pcr7.add(e)
        out += pcr7.components()
    out += _loader(d, by_pcr.get(8, []) + by_pcr.get(9, []))
    decomposed = {p for group in COMPONENT_GROUPS for p in group}
    layout = tuple(
        Measured(
            e.pcr,
            d.owner.get(e.number, "" if e.pcr in decomposed else f"pcr.{e.pcr}"),
            e.digests[bank],
        )
        for e in log.events
        if e.type != EV_NO_ACTION
    )
    return BootState(bank, tuple(out), tuple(sorted(by_pcr)), layout, initial_values(log, bank))

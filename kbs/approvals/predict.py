"""Predicting the PCR values of an update from a node's own boot log (as systemd-pcrlock does).

A node's last verified boot state keeps its log's layout: every extended event's PCR, component
and digest (``keylease.eventlog.bootstate.Measured``). Replacing one component's events by
others — a canary's events for it, or the one digest a policy now allows for a component that
is one event (a boot application, the EFI stub's command line or initrd) — and replaying gives
the PCR values the node will quote once it boots that update. Components whose value is a whole
PCR (``firmware``, ``boot-variables``, ``pcr.N``) are replaced by that value. PCRs the log does
not extend keep the values the node last quoted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from keylease.eventlog.bootstate import WHOLE_PCR, BootState, Measured
from keylease.eventlog.replay import HASHES, extend

__all__ = ["Swap", "canary_swap", "predict", "value_swap"]


@dataclass(frozen=True)
class Swap:
    """One component of the node's boot, replaced: by ``events`` (PCR, digest) measured where
    its first event was, or, for a whole-PCR component, by the PCR's ``value``."""

    component: str
    events: tuple[tuple[int, bytes], ...] = ()
    value: bytes | None = None


def _whole_pcr(component: str) -> int | None:
    if component.startswith("pcr."):
        return int(component[4:])
    return WHOLE_PCR.get(component)


def value_swap(state: BootState, component: str, value: str) -> Swap | None:
    """The swap that gives ``component`` the allowed ``value`` (a digest in the state's bank),
    when the node's log allows it: a whole-PCR component, or one measured as one event."""
    try:
        digest = bytes.fromhex(value)
    except ValueError:
        return None  # on/off, absent: not a measurement
    if len(digest) != HASHES[state.bank]().digest_size:
        return None
    if _whole_pcr(component) is not None:
        return Swap(component, value=digest)
    mine = [m for m in state.layout if m.component == component]
    if len(mine) != 1:
        return None
    return Swap(component, events=((mine[0].pcr, digest),))


def canary_swap(
    canary: BootState | None, component: str, quoted: Mapping[int, bytes]
) -> Swap | None:
    """The swap that makes ``component`` what the canary measured (``canary``: its boot state,
    None if it sent no log; ``quoted``: its PCRs)."""
    pcr = _whole_pcr(component)
    if pcr is not None:
        value = quoted.get(pcr)
        return None if value is None else Swap(component, value=value)
    if canary is None:
        return None
    events = tuple((m.pcr, m.digest) for m in canary.layout if m.component == component)
    return Swap(component, events=events) if events else None


def _measured(layout: Sequence[Measured], swaps: Mapping[str, Swap]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    placed: set[str] = set()
    for m in layout:
        swap = swaps.get(m.component)
        if swap is None or swap.value is not None:
            out.append((m.pcr, m.digest))
        elif m.component not in placed:
            placed.add(m.component)
            out += swap.events
    return out


def predict(
    state: BootState, quoted: Mapping[int, bytes], swaps: Sequence[Swap]
) -> dict[int, bytes] | None:
    """The PCR values (of every PCR ``quoted`` holds) the node would quote with ``swaps``
    applied to the boot ``state`` shows; None when its log does not allow the prediction (no
    layout recorded, or a component to replace that the node does not show)."""
    by_component = {s.component: s for s in swaps}
    event_swaps = [s.component for s in swaps if s.value is None]
    shown = {m.component for m in state.layout}
    if any(c not in shown for c in event_swaps) or (event_swaps and not state.layout):
        return None
    values = dict(quoted)
    if event_swaps:
        replayed = extend(state.bank, state.initial, _measured(state.layout, by_component))
        values.update({pcr: v for pcr, v in replayed.items() if pcr in quoted})
    for swap in swaps:
        pcr = _whole_pcr(swap.component)
        if swap.value is not None and pcr is not None and pcr in quoted:
            values[pcr] = swap.value
    return values

"""Which approval opens the sealed release now, chosen offline: the PCRs are read once per bank
and compared with each approval's values (no TPM command per approval), then the match is checked
in software before the TPM is asked.

The release is bound to this node, its policy group and the broker key that signed it (the
``Binding``); only approvals for all three can open it. Of those, one whose PCR values are the
TPM's now and whose limit the TPM clock has not reached, signed by the broker. When there is
none, ``NoApprovedState`` says why: no approval for this policy group at all; the approvals of
this state expired (in TPM time); or no approved state matches — then, from the node's own boot
event log (read and replayed as the broker does, ``keylease.eventlog``), it names the component
that differs from every approved state in the broker's wording ("PCR 8,9, kernel command line
[kernel-cmdline] (...): digest 5c6d…9e is not allowed by policy vm-boot (allowed: ...)").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import NoApprovedState, ReleaseInvalid
from agent.keystore import PcrReader
from agent.signature import ReleaseTrust
from keylease.api.v1.approvals import Approval, same_key, values_match, verify_approval
from keylease.api.v1.signing import SigningCertificate
from keylease.certificates import ec_public_key
from keylease.eventlog import EventLogError, analyse
from keylease.eventlog.bootstate import BootState, is_component_name
from keylease.eventlog.wording import ABSENT, not_allowed
from keylease.text import printable

__all__ = ["Binding", "choose"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Binding:
    """What a release's sealed object opens for: this node, a policy group, a signing key."""

    node_name: str
    group: str
    key: ec.EllipticCurvePublicKey


def _unbound(
    a: Approval, binding: Binding, keys: dict[bytes, ec.EllipticCurvePublicKey | None]
) -> str | None:
    """Why ``a`` cannot open the release ``binding`` describes; None if it can."""
    if a.policy_group != binding.group:
        return (
            f"it is for policy {printable(a.policy_group, 120)}, not {binding.group}, the "
            "policy this cache is bound to"
        )
    if a.signing_certificate not in keys:
        keys[a.signing_certificate] = ec_public_key(a.signing_certificate)
    key = keys[a.signing_certificate]
    if key is None or not same_key(key, binding.key):
        return (
            "it is not signed by the key this cache is bound to (another key: not the "
            "broker's, or one the broker no longer keeps)"
        )
    return None


def _read(read: PcrReader, approvals: Sequence[Approval]) -> dict[str, dict[int, bytes]]:
    wanted: dict[str, set[int]] = {}
    for a in approvals:
        wanted.setdefault(a.bank, set()).update(a.indices)
    return {bank: dict(read(bank, sorted(indices))) for bank, indices in wanted.items()}


def choose(
    approvals: Sequence[Approval],
    binding: Binding,
    read_pcrs: PcrReader,
    clock: int,
    trust: ReleaseTrust,
    event_log: Callable[[], bytes],
) -> Approval:
    """The approval to open the release with now (``clock``: the TPM's); NoApprovedState
    saying why there is none. ``event_log`` is read only to explain a state nothing approves."""
    own = [a for a in approvals if a.node_name == binding.node_name]
    if not own:
        raise NoApprovedState(f"no approval held for node {binding.node_name}")
    current = _read(read_pcrs, own)
    keys: dict[bytes, ec.EllipticCurvePublicKey | None] = {}
    here, refused = [], []
    for a in own:
        if not values_match(a, current):
            continue
        why = _unbound(a, binding, keys)
        if why is None:
            here.append(a)
        else:
            log.warning("not using an approval of this boot state (%s): %s", a.origin, why)
            refused.append(why)
    if not here:
        if refused:
            raise NoApprovedState(
                f"no approval of this boot state opens this cache: {'; '.join(refused)}"
            )
        mine = [a for a in own if _unbound(a, binding, keys) is None]
        if not mine:
            groups = sorted({a.policy_group for a in own})
            raise NoApprovedState(
                f"no approval held for policy {binding.group}, the one this cache is bound to "
                f"(the {len(own)} held are for policy {printable(', '.join(groups), 200)})"
            )
        raise NoApprovedState(
            "no approved state matches this boot: " + _explain(mine, current, event_log)
        )
    live = sorted((a for a in here if a.clock_limit > clock), key=lambda a: -a.clock_limit)
    if not live:
        last = max(here, key=lambda a: a.clock_limit)
        raise NoApprovedState(
            f"the approval of this boot state ({last.describe()}) expired: its TPM clock limit "
            f"is {last.clock_limit}, the TPM's clock is {clock}"
        )
    checked: dict[bytes, SigningCertificate] = {}
    for a in live:
        try:
            verify_approval(a, trust.issuers, ReleaseInvalid, checked)
        except ReleaseInvalid as exc:
            log.warning("not using an approval of this boot state (%s): %s", a.origin, exc)
            refused.append(str(exc))
            continue
        return a
    raise NoApprovedState(
        f"the approvals of this boot state are not the broker's: {'; '.join(refused)}"
    )


def _current_state(
    event_log: Callable[[], bytes], bank: str, current: Mapping[int, bytes]
) -> BootState | None:
    """This boot's components, from the event log, if it replays to the PCRs read now."""
    try:
        data = event_log()
        found = analyse(data, (bank,)) if data else None
    except (EventLogError, ReleaseInvalid, OSError):
        return None
    if found is None or bank not in found.states:
        return None
    replayed = found.replayed[bank]
    if any(current.get(i, v) != v for i, v in replayed.items()):
        return None  # not this boot's log
    return found.states[bank]


def _explain(
    mine: Sequence[Approval],
    current: Mapping[str, Mapping[int, bytes]],
    event_log: Callable[[], bytes],
) -> str:
    bank = mine[0].bank
    same_bank = [a for a in mine if a.bank == bank]
    state = _current_state(event_log, bank, current[bank])
    if state is None:
        now = current[bank]
        indices = sorted({i for a in same_bank for i in a.indices})
        differ = [i for i in indices if all(a.values.get(i, now.get(i)) != now.get(i)
                                            for a in same_bank)]  # fmt: skip
        pcrs = ",".join(map(str, differ or indices))
        return (
            f"PCR {pcrs} ({bank}) holds a value no approved state has (without this boot's "
            "event log the component cannot be named)"
        )

    def value_now(name: str) -> tuple[str, str | None]:
        """The component's value in this boot (``absent`` when it shows none) and summary."""
        if name.startswith("pcr."):
            v = current[bank].get(int(name[4:]))
            return (v.hex() if v else ABSENT), None
        found = state.get(name)
        return (found.value, found.summary) if found else (ABSENT, None)

    diffs = []
    for a in same_bank:
        diffs.append([c for c in a.components if is_component_name(c.name)
                      and value_now(c.name)[0] != c.value])  # fmt: skip
    names = [c.name for c in diffs[0]]
    common = [n for n in names if all(any(c.name == n for c in d) for d in diffs)]
    if not common:
        closest = min(range(len(diffs)), key=lambda k: len(diffs[k]))
        common = [c.name for c in diffs[closest]]
        same_bank = [same_bank[closest]]
    lines = []
    for name in common:
        value, summary = value_now(name)
        allowed = list(dict.fromkeys((c.summary, c.value) for a in same_bank
                                     for c in a.components if c.name == name))  # fmt: skip
        lines.append(not_allowed(name, summary, value, mine[0].policy_group, allowed))
    return "; ".join(lines) or f"the {bank} PCR values differ from every approved state"

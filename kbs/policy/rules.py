"""A policy document: for each named component, the set of values it may have.

A ``Rule`` names a component (``keylease.eventlog.bootstate``: ``firmware``, ``boot-app.3``, ``db``,
``pcr.10``, ...) and allows a set of values, each with a note saying where it came from; for PK,
KEK, db and dbx it may instead (or also) require that the variable *contains* at least a set of
entries ("a dbx with at least this revocation set"). Values: a digest in the policy's bank (hex),
``on``/``off`` for ``secure-boot``, ``absent`` for a component the node must not show. A policy
with no rule, and a rule that allows nothing, are refused: empty policy means deny, and that is
said by not assigning one.

``check_document`` is the one validation of operator input (command line, admin API, policy
files); ``document_json``/``document_from_json`` are the database form.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kbs.errors import OperatorError, StoreError
from keylease.eventlog.bootstate import COMPONENT_GROUPS, component_pcrs, is_component_name
from keylease.eventlog.wording import ABSENT, component_label, short_value

__all__ = [
    "ABSENT",
    "BANK_DIGEST_SIZES",
    "CONTAINS_COMPONENTS",
    "AllowedValue",
    "Document",
    "Rule",
    "check_bank",
    "check_document",
    "component_label",
    "document_from_json",
    "document_json",
    "short_value",
]

BANK_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48}
CONTAINS_COMPONENTS = ("pk", "kek", "db", "dbx")
MAX_NOTE = 200
MAX_VALUES = 256
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class AllowedValue:
    value: str
    note: str = ""


@dataclass(frozen=True)
class Rule:
    component: str
    allowed: tuple[AllowedValue, ...] = ()
    contains: tuple[str, ...] = ()  # entry ids the variable must hold (pk/kek/db/dbx)

    @property
    def pcrs(self) -> tuple[int, ...]:
        return component_pcrs(self.component)

    @property
    def values(self) -> frozenset[str]:
        return frozenset(a.value for a in self.allowed)


@dataclass(frozen=True)
class Document:
    """A policy's content: its bank and rules (sorted by component name)."""

    bank: str
    rules: tuple[Rule, ...]

    @property
    def pcrs(self) -> tuple[int, ...]:
        """The PCRs the policy covers: the release is sealed to their quoted values."""
        return tuple(sorted({p for r in self.rules for p in r.pcrs}))

    def rule(self, component: str) -> Rule | None:
        return next((r for r in self.rules if r.component == component), None)


def check_bank(bank: str) -> str:
    if bank not in BANK_DIGEST_SIZES:
        raise OperatorError(
            f"unsupported PCR bank {bank[:32]!r}; use one of {', '.join(BANK_DIGEST_SIZES)}"
        )
    return bank


def _check_value(component: str, value: str, bank: str) -> None:
    size = BANK_DIGEST_SIZES[bank]
    if component == "secure-boot":
        ok = value in ("on", "off", ABSENT)
        expected = "on, off or absent"
    elif component.startswith("pcr."):
        ok = len(value) == 2 * size and bool(_HEX.fullmatch(value))
        expected = f"a {bank} PCR value ({2 * size} lower-case hex digits)"
    else:
        ok = value == ABSENT or (len(value) == 2 * size and bool(_HEX.fullmatch(value)))
        expected = f"a {bank} digest ({2 * size} lower-case hex digits) or absent"
    if not ok:
        raise OperatorError(f"component {component}: value {value[:80]!r} is not {expected}")


def _check_note(component: str, note: str) -> None:
    if len(note) > MAX_NOTE or not note.isprintable():
        raise OperatorError(
            f"component {component}: a note must be printable text of at most {MAX_NOTE} "
            f"characters, got {note[:40]!r}"
        )


def _check_rule(rule: Rule, bank: str) -> Rule:
    name = rule.component
    if not is_component_name(name):
        raise OperatorError(
            f"unknown component {name[:80]!r}: use firmware, boot-variables, boot-app.N, "
            "secure-boot, pk, kek, db, dbx, authorities, sb-config, kernel-cmdline, initrd, "
            "bootloader-config or pcr.N (0-23)"
        )
    if not rule.allowed and not rule.contains:
        raise OperatorError(
            f"component {name} allows no value; a component that nothing may pass denies "
            "every node (remove the component, or unassign the policy)"
        )
    if len(rule.allowed) > MAX_VALUES or len(rule.contains) > MAX_VALUES:
        raise OperatorError(f"component {name} lists more than {MAX_VALUES} values")
    seen: set[str] = set()
    for allowed in rule.allowed:
        _check_value(name, allowed.value, bank)
        _check_note(name, allowed.note)
        if allowed.value in seen:
            raise OperatorError(f"component {name} allows {short_value(allowed.value)} twice")
        seen.add(allowed.value)
    if rule.contains:
        if name not in CONTAINS_COMPONENTS:
            raise OperatorError(
                f"component {name}: `contains` applies to {', '.join(CONTAINS_COMPONENTS)} only"
            )
        for entry in rule.contains:
            if len(entry) != 64 or not _HEX.fullmatch(entry):
                raise OperatorError(
                    f"component {name}: entry {entry[:80]!r} is not 64 lower-case hex digits "
                    "(SHA-256 of the entry: a dbx hash as published, or a certificate's DER)"
                )
        if len(set(rule.contains)) != len(rule.contains):
            raise OperatorError(f"component {name} lists an entry twice in `contains`")
    return Rule(name, rule.allowed, tuple(sorted(rule.contains)))


def check_document(bank: str, rules: Iterable[Rule]) -> Document:
    """Validate a policy's content; OperatorError naming the first problem."""
    check_bank(bank)
    checked = [_check_rule(r, bank) for r in rules]
    if not checked:
        raise OperatorError("a policy needs at least one component; empty policy means deny")
    names = [r.component for r in checked]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise OperatorError(f"component {', '.join(twice)} is given twice")
    return Document(bank, tuple(sorted(checked, key=lambda r: _order(r.component))))


def _order(component: str) -> tuple[int, int, int]:
    """Display order: by PCR, then as ``COMPONENT_GROUPS`` lists them, then by index."""
    pcrs = component_pcrs(component)
    kind, _, n = component.partition(".")
    members = next((m for g, m in COMPONENT_GROUPS.items() if g == pcrs), ())
    position = members.index(kind) if kind in members else 0
    return (pcrs[0], position, int(n) if n.isdigit() else 0)


def document_json(doc: Document) -> str:
    rules: list[dict[str, object]] = []
    for r in doc.rules:
        entry: dict[str, object] = {"component": r.component}
        if r.allowed:
            entry["allow"] = [{"value": a.value, "note": a.note} for a in r.allowed]
        if r.contains:
            entry["contains"] = list(r.contains)
        rules.append(entry)
    return json.dumps({"bank": doc.bank, "rules": rules}, separators=(",", ":"))


def _rules(raw: Sequence[Mapping[str, object]]) -> list[Rule]:
    out = []
    for r in raw:
        allow = r.get("allow", [])
        contains = r.get("contains", [])
        if not isinstance(allow, list) or not isinstance(contains, list):
            raise TypeError("allow and contains must be lists")
        out.append(
            Rule(
                str(r["component"]),
                tuple(AllowedValue(str(a["value"]), str(a.get("note", ""))) for a in allow),
                tuple(str(c) for c in contains),
            )
        )
    return out


def document_from_json(text: str) -> Document:
    """The document stored in the database (written by ``document_json``)."""
    try:
        raw = json.loads(text)
        rules = raw["rules"]
        if not isinstance(rules, list):
            raise TypeError("rules must be a list")
        return Document(str(raw["bank"]), tuple(_rules(rules)))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"a stored policy document is unreadable: {exc}") from None

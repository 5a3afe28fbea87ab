"""The policy file: a policy as TOML, for review and version control (``policy export`` /
``policy apply``)::

    # keylease policy; `keylease-kbs policy apply FILE` makes the broker's policy exactly this
    name = "prod-boot"
    bank = "sha256"
    selectors = ["cluster=prod"]          # optional: without it, assignments are left alone

    [components."boot-app.3"]
    allow = [
      { value = "9f2c...e1", note = "\\EFI\\debian\\vmlinuz-6.1.0-28; allowed from worker-2" },
    ]

    [components."dbx"]
    contains = ["80b4d96931bf0d02fd91a61e19d14f1da452e66db2408ca8604d411f92659f0a"]

``render`` writes it (a small writer of our own: strings, arrays and inline tables are all a
policy needs); ``parse`` reads it with ``tomllib`` and refuses anything it does not expect, with
one clear error naming the file and the key. ``parse(render(p))`` gives ``p`` back.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kbs.errors import OperatorError
from kbs.model import Policy, check_name, format_selector, parse_selector
from kbs.policy.rules import AllowedValue, Document, Rule, check_document

__all__ = ["PolicyFile", "parse", "render"]

MAX_FILE = 1 << 20
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _string(value: str) -> str:
    """A TOML basic string."""
    out = []
    for c in value:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def render(policy: Policy) -> str:
    doc = policy.document
    lines = [
        f"# keylease policy {policy.name}, from `keylease-kbs policy export`.",
        "# `keylease-kbs policy apply FILE` makes the broker's policy exactly this.",
        f"name = {_string(policy.name)}",
        f"bank = {_string(doc.bank)}",
        "selectors = [" + ", ".join(_string(format_selector(s)) for s in policy.selectors) + "]",
    ]
    for rule in doc.rules:
        lines += ["", f"[components.{_string(rule.component)}]"]
        if rule.allowed:
            lines.append("allow = [")
            lines += [
                f"  {{ value = {_string(a.value)}, note = {_string(a.note)} }},"
                for a in rule.allowed
            ]
            lines.append("]")
        if rule.contains:
            lines.append("contains = [")
            lines += [f"  {_string(c)}," for c in rule.contains]
            lines.append("]")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PolicyFile:
    name: str
    document: Document
    selectors: tuple[Mapping[str, str], ...] | None  # None: the file leaves assignments alone


def _fail(source: str, text: str) -> OperatorError:
    return OperatorError(f"{source}: {text}")


def _keys(table: Mapping[str, Any], allowed: set[str], where: str, source: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(
            source, f"unknown key {unknown[0]!r} in {where} (expected {', '.join(sorted(allowed))})"
        )


def _rule(name: str, table: Any, source: str) -> Rule:
    where = f"[components.{name!r}]"
    if not isinstance(table, dict):
        raise _fail(source, f"{where} must be a table")
    _keys(table, {"allow", "contains"}, where, source)
    allow, contains = table.get("allow", []), table.get("contains", [])
    if not isinstance(allow, list) or not isinstance(contains, list):
        raise _fail(source, f"{where}: allow and contains must be arrays")
    values = []
    for entry in allow:
        if not isinstance(entry, dict):
            raise _fail(source, f'{where}: each allow entry is {{ value = "...", note = "..." }}')
        _keys(entry, {"value", "note"}, f"{where} allow", source)
        value, note = entry.get("value"), entry.get("note", "")
        if not isinstance(value, str) or not isinstance(note, str):
            raise _fail(source, f"{where}: value and note must be strings")
        values.append(AllowedValue(value, note))
    if not all(isinstance(c, str) for c in contains):
        raise _fail(source, f"{where}: contains must be an array of strings")
    return Rule(name, tuple(values), tuple(contains))


def parse(data: bytes, source: str) -> PolicyFile:
    """Read a policy file; OperatorError naming ``source`` and what is wrong."""
    if len(data) > MAX_FILE:
        raise _fail(source, f"larger than {MAX_FILE} bytes")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _fail(source, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, f"invalid TOML: {exc}") from None
    _keys(raw, {"name", "bank", "selectors", "components"}, "the file", source)
    name, bank, components = raw.get("name"), raw.get("bank", "sha256"), raw.get("components")
    if not isinstance(name, str) or not isinstance(bank, str):
        raise _fail(source, 'needs name = "..." (and bank = "sha256", the default)')
    if not isinstance(components, dict) or not components:
        raise _fail(source, "needs at least one [components.NAME] table; empty policy means deny")
    selectors = raw.get("selectors")
    if selectors is not None and (
        not isinstance(selectors, list) or not all(isinstance(s, str) for s in selectors)
    ):
        raise _fail(source, 'selectors must be an array of "k=v[,k=v]" strings')
    try:
        check_name(name, "policy")
        document = check_document(bank, [_rule(n, t, source) for n, t in components.items()])
        parsed = None if selectors is None else tuple(parse_selector(s) for s in selectors)
    except OperatorError as exc:
        raise _fail(source, str(exc)) from None
    if parsed is not None and len({format_selector(s) for s in parsed}) != len(parsed):
        raise _fail(source, "a selector is listed twice")
    return PolicyFile(name, document, parsed)

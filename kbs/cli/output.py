"""How ``keylease-kbs`` listings look: aligned tables for people, JSON (``--json``) for scripts.

JSON objects use plain types only: datetimes as ISO-8601 text, bytes as hex, PCR maps as
``{"index": "hex"}``. Key material is never part of any output. Text a node or a certificate
supplied (node metadata, audit details quoting a refused EK certificate's names) is escaped for
the terminal (``keylease.text.printable``) in tables and details; JSON escapes it itself (control
and non-ASCII characters as ``\\uXXXX``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from kbs.model import (
    AuditEntry,
    BootRecord,
    Grant,
    KeyDetails,
    Node,
    Policy,
    StoredKey,
    format_selector,
)
from kbs.policy.learn import DiffRow
from kbs.policy.rules import component_label, short_value
from keylease.eventlog.bootstate import BootState
from keylease.text import printable

__all__ = [
    "audit_json",
    "audit_rows",
    "diff_json",
    "diff_rows",
    "dump_json",
    "grant_json",
    "key_details",
    "key_details_json",
    "key_json",
    "key_rows",
    "node_details",
    "node_json",
    "node_rows",
    "policy_details",
    "policy_json",
    "policy_rows",
    "render_table",
]

Json = dict[str, object]


def _when(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat(timespec="seconds")


def _pcrs(pcrs: Mapping[int, bytes]) -> dict[str, str]:
    return {str(i): pcrs[i].hex() for i in sorted(pcrs)}


def dump_json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=False, ensure_ascii=True)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is never padded. Every cell is
    escaped for the terminal."""
    table = [list(headers), *[[printable(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = []
    for row in table:
        cells = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _state_json(state: BootState) -> Json:
    return {
        "touched_pcrs": list(state.touched),
        "components": [
            {"name": c.name, "pcrs": list(c.pcrs), "value": c.value, "summary": c.summary,
             "entries": list(c.entries)}
            for c in state.components
        ],
    }  # fmt: skip


def node_json(node: Node, boot: BootRecord | None = None) -> Json:
    out: Json = {
        "name": node.name,
        "state": node.state.value,
        "labels": dict(sorted(node.labels.items())),
        "ek_hash": node.ek_hash,
        "enrolled_at": _when(node.enrolled_at),
        "last_attested_at": _when(node.last_attested_at),
        "pcrs": {b: _pcrs(v) for b, v in sorted(node.pcr_banks.items())},
        "reset_count": node.reset_count,
        "restart_count": node.restart_count,
        "metadata": dict(sorted(node.metadata.items())),
        "last_denial": node.last_denial,
        "last_denial_at": _when(node.last_denial_at),
    }
    if boot is not None:
        out["boot_log_sha256"] = boot.log_digest
        out["boot_state"] = {b: _state_json(s) for b, s in sorted(boot.states.items())}
    return out


def node_rows(nodes: Sequence[Node]) -> str:
    return render_table(
        ["NAME", "STATE", "LABELS", "EK_HASH_PREFIX", "LAST_ATTESTED"],
        [
            [
                n.name,
                n.state.value,
                format_selector(n.labels) or "-",
                n.ek_hash[:16],
                _when(n.last_attested_at) or "never",
            ]
            for n in nodes
        ],
    )


def node_details(node: Node, boot: BootRecord | None = None) -> str:
    lines = [
        f"name:             {node.name}",
        f"state:            {node.state.value}",
        f"labels:           {format_selector(node.labels) or '-'}",
        f"ek_hash:          {node.ek_hash}",
        f"enrolled_at:      {_when(node.enrolled_at)}",
        f"last_attested_at: {_when(node.last_attested_at) or 'never'}",
    ]
    if node.reset_count is not None:
        lines.append(f"reset/restart:    {node.reset_count}/{node.restart_count}")
    for key, value in sorted(node.metadata.items()):
        lines.append(f"metadata:         {key}={value}")
    if node.last_denial is not None:
        lines.append(f"last denial:      {_when(node.last_denial_at)}: {node.last_denial}")
    if boot is None:
        lines.append("boot state:       no event log in the last attestation")
    else:
        bank = "sha256" if "sha256" in boot.states else min(boot.states, default="")
        state = boot.states.get(bank)
        lines.append(f"boot state ({bank}, event log sha256 {boot.log_digest[:16]}…):")
        for c in state.components if state else ():
            lines.append(f"  {c.name:18} PCR {','.join(map(str, c.pcrs)):4} "
                         f"{short_value(c.value):10} {c.summary}")  # fmt: skip
    for bank, values in sorted(node.pcr_banks.items()):
        lines.append(f"pcrs ({bank}):")
        lines.extend(f"  {i:2d}: {values[i].hex()}" for i in sorted(values))
    return "\n".join(printable(line) for line in lines)


def key_json(key: StoredKey) -> Json:
    return {
        "name": key.name,
        "version": key.version,
        "state": key.state.value,
        "algorithm": key.algorithm,
        "created_at": _when(key.created_at),
        "retired_at": _when(key.retired_at),
    }


def key_rows(keys: Sequence[StoredKey]) -> str:
    return render_table(
        ["NAME", "VERSION", "STATE", "ALGORITHM", "CREATED_AT", "RETIRED_AT"],
        [
            [k.name, str(k.version), k.state.value, k.algorithm, _when(k.created_at) or "",
             _when(k.retired_at) or "-"]
            for k in keys
        ],
    )  # fmt: skip


def key_details_json(details: KeyDetails) -> Json:
    return {
        "name": details.name,
        "versions": [key_json(k) for k in details.versions],
        "grants": [format_selector(s) for s in details.grants],
        "holders": [
            {
                "node": h.node,
                "versions": list(h.versions),
                "released_at": _when(h.released_at),
                "lease_until": _when(h.lease_until),
            }
            for h in details.holders
        ],
    }


def key_details(details: KeyDetails) -> str:
    held: dict[int, int] = {}
    for holder in details.holders:
        for version in holder.versions:
            held[version] = held.get(version, 0) + 1
    versions = render_table(
        ["VERSION", "STATE", "ALGORITHM", "CREATED_AT", "RETIRED_AT", "NODES"],
        [
            [str(k.version), k.state.value, k.algorithm, _when(k.created_at) or "",
             _when(k.retired_at) or "-", str(held.get(k.version, 0))]
            for k in details.versions
        ],
    )  # fmt: skip
    lines = [
        f"name:       {details.name}",
        f"granted to: {' '.join(format_selector(s) for s in details.grants) or '-'}",
        "versions:",
        *(f"  {line}" for line in versions.splitlines()),
        "nodes holding it (their latest release, while its lease lasts):",
    ]
    if not details.holders:
        return "\n".join([*lines, "  none"])
    holders = render_table(
        ["NODE", "VERSIONS", "RELEASED_AT", "LEASE_UNTIL"],
        [
            [h.node, ",".join(str(v) for v in h.versions), _when(h.released_at) or "",
             _when(h.lease_until) or ""]
            for h in details.holders
        ],
    )  # fmt: skip
    return "\n".join([*lines, *(f"  {line}" for line in holders.splitlines())])


def grant_json(grant: Grant) -> Json:
    return {
        "key": grant.key_name,
        "selector": dict(sorted(grant.selector.items())),
        "created_at": _when(grant.created_at),
    }


def policy_json(policy: Policy) -> Json:
    return {
        "name": policy.name,
        "pcr_bank": policy.pcr_bank,
        "pcrs": list(policy.document.pcrs),
        "components": {
            r.component: {
                "allow": [{"value": a.value, "note": a.note} for a in r.allowed],
                "contains": list(r.contains),
            }
            for r in policy.rules
        },
        "selectors": [format_selector(s) for s in policy.selectors],
    }


def policy_rows(policies: Sequence[Policy]) -> str:
    return render_table(
        ["NAME", "BANK", "PCRS", "COMPONENTS", "SELECTORS"],
        [
            [
                p.name,
                p.pcr_bank,
                ",".join(str(i) for i in p.document.pcrs),
                str(len(p.rules)),
                " ".join(format_selector(s) for s in p.selectors) or "-",
            ]
            for p in policies
        ],
    )


def policy_details(policy: Policy) -> str:
    """``policy show``: each component, what it is, and its allowed values with their notes."""
    lines = [
        f"policy {policy.name} ({policy.pcr_bank}), PCRs "
        f"{','.join(str(i) for i in policy.document.pcrs)}",
        f"assigned to: {' '.join(format_selector(s) for s in policy.selectors) or '-'}",
    ]
    for rule in policy.rules:
        pcrs = ",".join(str(p) for p in rule.pcrs)
        lines.append(f"{rule.component} ({component_label(rule.component)}, PCR {pcrs}):")
        lines.extend(f"  allow {short_value(a.value):10} {a.note}".rstrip() for a in rule.allowed)
        lines.extend(f"  contains {c}" for c in rule.contains)
    return "\n".join(lines)


def diff_json(rows: Sequence[DiffRow]) -> list[Json]:
    return [
        {"component": r.component, "pcrs": list(r.pcrs), "node_value": r.node_value,
         "node_summary": r.node_summary, "result": r.result, "allowed": r.allowed}
        for r in rows
    ]  # fmt: skip


def diff_rows(rows: Sequence[DiffRow]) -> str:
    return render_table(
        ["COMPONENT", "PCR", "RESULT", "NODE", "ALLOWED"],
        [
            [
                r.component,
                ",".join(str(p) for p in r.pcrs),
                r.result,
                f"{short_value(r.node_value)} {r.node_summary}".strip(),
                r.allowed,
            ]
            for r in rows
        ],
    )


def audit_json(entry: AuditEntry) -> Json:
    return {
        "id": entry.id,
        "at": _when(entry.at),
        "actor": entry.actor,
        "event": entry.event,
        "node": entry.node,
        "result": entry.result,
        "detail": entry.detail,
    }


def audit_rows(entries: Sequence[AuditEntry]) -> str:
    return render_table(
        ["AT", "ACTOR", "EVENT", "NODE", "RESULT", "DETAIL"],
        [[_when(e.at) or "", e.actor, e.event, e.node or "-", e.result, e.detail] for e in entries],
    )

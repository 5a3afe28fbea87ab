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

from kbs.model import AuditEntry, Grant, Node, Policy, StoredKey, format_selector
from keylease.text import printable

__all__ = [
    "audit_json",
    "audit_rows",
    "dump_json",
    "grant_json",
    "key_json",
    "node_details",
    "node_json",
    "node_rows",
    "policy_json",
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


def node_json(node: Node) -> Json:
    return {
        "name": node.name,
        "state": node.state.value,
        "labels": dict(sorted(node.labels.items())),
        "ek_hash": node.ek_hash,
        "enrolled_at": _when(node.enrolled_at),
        "last_attested_at": _when(node.last_attested_at),
        "pcr_bank": node.pcr_bank,
        "pcrs": _pcrs(node.pcrs),
        "reset_count": node.reset_count,
        "restart_count": node.restart_count,
        "metadata": dict(sorted(node.metadata.items())),
    }


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


def node_details(node: Node) -> str:
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
    if node.pcr_bank is not None:
        lines.append(f"pcrs ({node.pcr_bank}):")
        lines.extend(f"  {i:2d}: {node.pcrs[i].hex()}" for i in sorted(node.pcrs))
    return "\n".join(printable(line) for line in lines)


def key_json(key: StoredKey) -> Json:
    return {
        "name": key.name,
        "version": key.version,
        "algorithm": key.algorithm,
        "created_at": _when(key.created_at),
    }


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
        "pcrs": _pcrs(policy.pcrs),
        "selectors": [format_selector(s) for s in policy.selectors],
    }


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

"""`keylease-agent status`: enrollment, lease, installed keys per directory, last attestation.

Read-only: the state directory's records plus a listing of each key directory. Also records the
outcome of ``attest --once`` so that ``status`` tells about one-shot runs too.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from agent.config import AgentConfig
from agent.errors import AgentError, KeystoreError
from agent.keystore import key_directories, parse_key_file
from agent.release import Bundle
from agent.state import StateDir
from agent.status import AgentStatus, load_status, save_status

__all__ = ["record_once", "render_status", "status_report"]


def record_once(
    cfg: AgentConfig, state: StateDir, result: str, reason: str | None, bundle: Bundle | None
) -> None:
    """Record what ``attest --once`` did (best effort: a status file is not worth a failure)."""
    now = datetime.now(UTC)
    status = load_status(state) or AgentStatus(node_name=cfg.node_name)
    changes: dict[str, Any] = {
        "node_name": cfg.node_name,
        "last_attestation_at": now,
        "last_result": result,
        "last_reason": reason,
        "pid": None,
    }
    if bundle is not None:
        changes |= {
            "state": "keys installed",
            "keys": tuple((k.name, k.version) for k in bundle.keys),
            "lease_not_after": bundle.not_after,
            "source": "broker",
        }
    elif result == "denied":
        changes |= {"state": "denied", "keys": (), "lease_not_after": None}
        changes |= {"last_denial_at": now, "last_denial_reason": reason}
    else:
        changes["state"] = {"pending": "pending approval"}.get(result, result)
    with contextlib.suppress(AgentError):
        save_status(state, status.with_(**changes))


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def status_report(cfg: AgentConfig) -> dict[str, Any]:
    state = StateDir.open(cfg.state_dir)
    enrollment = state.load_enrollment()
    status = load_status(state)
    directories: dict[str, Any] = {}
    for kd in key_directories(cfg):
        try:
            files = [(file, parse_key_file(file)) for file in kd.installed()]
            directories[str(kd.directory)] = [
                {"name": parsed[0], "version": parsed[1], "file": f"{kd.directory}/{file}"}
                for file, parsed in files
                if parsed is not None
            ]
        except KeystoreError as exc:
            directories[str(kd.directory)] = {"error": str(exc)}
    return {
        "node": cfg.node_name,
        "broker": cfg.kbs,
        "enrolled": enrollment is not None and state.load_ak() is not None,
        "enrollment_state": enrollment.state if enrollment else None,
        "state": status.state if status else "never run",
        "lease_not_after": _time(status.lease_not_after) if status else None,
        "keys_from": status.source if status else None,
        "key_dirs": directories,
        "last_attestation_at": _time(status.last_attestation_at) if status else None,
        "last_result": status.last_result if status else None,
        "last_reason": status.last_reason if status else None,
        "last_denial_at": _time(status.last_denial_at) if status else None,
        "last_denial_reason": status.last_denial_reason if status else None,
        "daemon_pid": status.pid if status else None,
        "updated_at": _time(status.updated_at) if status else None,
    }


def render_status(report: dict[str, Any]) -> str:
    enrolled = "yes" if report["enrolled"] else "no"
    if report["enrollment_state"]:
        enrolled += f" ({report['enrollment_state']} at enrollment)"
    lines = [
        f"node:             {report['node']} (broker {report['broker']})",
        f"enrolled:         {enrolled}",
        f"state:            {report['state']}",
        f"lease until:      {report['lease_not_after'] or '-'}",
        f"last attestation: {report['last_attestation_at'] or '-'} "
        f"{report['last_result'] or ''}".rstrip(),
    ]
    if report["last_result"] not in (None, "ok") and report["last_reason"]:
        lines.append(f"  reason:         {report['last_reason']}")
    if report["last_denial_reason"]:
        lines.append(
            f"last denial:      {report['last_denial_at']}: {report['last_denial_reason']}"
        )
    lines.append("keys:")
    for directory, entries in report["key_dirs"].items():
        if isinstance(entries, dict):
            lines.append(f"  {directory}: {entries['error']}")
            continue
        shown = ", ".join(f"{e['name']} v{e['version'] or '?'}" for e in entries) or "none"
        lines.append(f"  {directory}: {shown}")
    return "\n".join(lines)

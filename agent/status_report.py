"""`keylease-agent status`: enrollment, lease, installed keys per directory, last attestation,
and the approved boot states the node holds, each with its expiry.

Read-only: the state directory's records plus a listing of each key directory; the TPM is not
opened (a TPM without a resource manager must have one user, the daemon). An approval's expiry
is its limit in the TPM's clock; the wall-clock time shown is an estimate from the TPM clock the
agent last read (at its last attestation or restore) and when. Also records the outcome of
``attest --once`` so that ``status`` tells about one-shot runs too.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.config import AgentConfig
from agent.errors import AgentError, KeystoreError
from agent.keystore import ApprovalStore, key_directories, parse_key_file
from agent.release import Bundle
from agent.state import StateDir
from agent.status import AgentStatus, load_status, save_status
from keylease.api.v1.approvals import Approval

__all__ = ["record_once", "render_status", "status_report"]


def record_once(
    cfg: AgentConfig,
    state: StateDir,
    result: str,
    reason: str | None,
    bundle: Bundle | None,
    clock: int | None = None,
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
            "lease_clock_limit": bundle.lease_clock_limit or None,
            "source": "broker",
            "approved_state": None,
        }
    if clock is not None:
        changes |= {"tpm_clock": clock, "tpm_clock_at": now}
    elif result == "denied":
        changes |= {"state": "denied", "keys": (), "lease_not_after": None}
        changes |= {"last_denial_at": now, "last_denial_reason": reason}
    else:
        changes["state"] = {"pending": "pending approval"}.get(result, result)
    with contextlib.suppress(AgentError):
        save_status(state, status.with_(**changes))


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _approval(a: Approval, status: AgentStatus | None) -> dict[str, Any]:
    expires = None
    if status is not None and status.tpm_clock is not None and status.tpm_clock_at is not None:
        expires = status.tpm_clock_at + timedelta(milliseconds=a.clock_limit - status.tpm_clock)
    return {
        "policy": a.policy_group,
        "origin": a.origin,
        "components": [
            {"name": c.name, "value": c.value, "summary": c.summary} for c in a.components
        ],
        "bank": a.bank,
        "pcrs": {str(i): v.hex() for i, v in a.pcrs},
        "tpm_clock_limit": a.clock_limit,
        "expired": status is not None
        and status.tpm_clock is not None
        and a.clock_limit <= status.tpm_clock,
        "expires_at_estimate": _time(expires),
        "state": a.describe(),
    }


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
        "lease_tpm_clock_limit": status.lease_clock_limit if status else None,
        "opened_with": status.approved_state if status else None,
        "tpm_clock": status.tpm_clock if status else None,
        "tpm_clock_read_at": _time(status.tpm_clock_at) if status else None,
        "approvals": [_approval(a, status) for a in ApprovalStore(state).load()],
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
    if report["opened_with"]:
        lines.append(f"opened with:      {report['opened_with']}")
    clock = report["tpm_clock"]
    lines.append(
        f"approvals:        {len(report['approvals'])} held"
        + (f" (TPM clock {clock} at {report['tpm_clock_read_at']})" if clock is not None else "")
    )
    for a in report["approvals"]:
        when = "expired" if a["expired"] else f"until ~{a['expires_at_estimate'] or '?'}"
        lines.append(f"  {a['state']}")
        lines.append(f"    TPM clock limit {a['tpm_clock_limit']} ({when})")
    lines.append("keys:")
    for directory, entries in report["key_dirs"].items():
        if isinstance(entries, dict):
            lines.append(f"  {directory}: {entries['error']}")
            continue
        shown = ", ".join(f"{e['name']} v{e['version'] or '?'}" for e in entries) or "none"
        lines.append(f"  {directory}: {shown}")
    return "\n".join(lines)

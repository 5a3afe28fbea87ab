"""What the agent last did, kept in ``state_dir/status.json`` for `keylease-agent status`.

Written by the daemon after every step (and by ``attest --once``); holds names, versions, times
and reasons only — never key material.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from agent.state import StateDir

__all__ = ["AgentStatus", "describe", "load_status", "save_status"]

STATUS_FILE = "status.json"


@dataclass(frozen=True)
class AgentStatus:
    node_name: str
    state: str = "starting"  # starting | keys installed | pending approval | denied | ...
    keys: tuple[tuple[str, int], ...] = ()  # (name, version) installed now
    lease_not_after: datetime | None = None
    lease_clock_limit: int | None = None  # where the lease ends in the TPM's clock (ms)
    source: str | None = None  # "cache" or "broker": where the installed keys came from
    approved_state: str | None = None  # the approval the installed keys were opened with
    tpm_clock: int | None = None  # the TPM's clock last read (ms), and when (the wall clock):
    tpm_clock_at: datetime | None = None  # `status` estimates approvals' expiry from them
    last_attestation_at: datetime | None = None
    last_result: str | None = None  # ok | pending | denied | unreachable | error
    last_reason: str | None = None
    last_denial_at: datetime | None = None
    last_denial_reason: str | None = None
    pid: int | None = None
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def with_(self, **changes: Any) -> AgentStatus:
        return replace(self, updated_at=datetime.now(UTC), **changes)


def describe(status: AgentStatus) -> str:
    """The one-line STATUS= text, e.g. "3 keys, lease until 12:04:10, last attestation ok"."""
    if status.keys:
        lease = status.lease_not_after.strftime("%H:%M:%S") if status.lease_not_after else "?"
        head = f"{len(status.keys)} key{'s' if len(status.keys) != 1 else ''}, lease until {lease}"
    else:
        head = "no keys"
    tail = f"last attestation {status.last_result}" if status.last_result else status.state
    if status.last_result and status.last_result != "ok" and status.last_reason:
        tail += f": {status.last_reason}"
    return f"{head}, {tail}"[:400]


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    return value


def save_status(state: StateDir, status: AgentStatus) -> None:
    data = {k: _encode(v) for k, v in asdict(status).items()}
    state.write(STATUS_FILE, json.dumps(data, indent=2, sort_keys=True).encode())


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def load_status(state: StateDir) -> AgentStatus | None:
    """The last status written, or None if there is none or it is unreadable."""
    raw = state.read(STATUS_FILE)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return AgentStatus(
            node_name=str(data["node_name"]),
            state=str(data["state"]),
            keys=tuple((str(n), int(v)) for n, v in data["keys"]),
            lease_not_after=_time(data.get("lease_not_after")),
            lease_clock_limit=_int(data.get("lease_clock_limit")),
            source=data.get("source"),
            approved_state=data.get("approved_state"),
            tpm_clock=_int(data.get("tpm_clock")),
            tpm_clock_at=_time(data.get("tpm_clock_at")),
            last_attestation_at=_time(data.get("last_attestation_at")),
            last_result=data.get("last_result"),
            last_reason=data.get("last_reason"),
            last_denial_at=_time(data.get("last_denial_at")),
            last_denial_reason=data.get("last_denial_reason"),
            pid=data.get("pid"),
            updated_at=_time(data.get("updated_at")) or datetime.now(UTC),
        )
    except (ValueError, KeyError, TypeError):
        return None

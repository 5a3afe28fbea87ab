"""What wakes the daemon's worker loop: signals, the network, the broker's watch stream."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from keylease.api.v1.approvals import Approval

__all__ = ["Pushed", "Wake"]


class Wake(Enum):
    NETWORK = "network changed"
    CHANGED = "broker: grants or keys changed"
    REVOKED = "broker: node revoked"
    RELOAD = "SIGHUP"
    STOP = "stop"


@dataclass(frozen=True)
class Pushed:
    """Approvals the watch stream carried (a policy widened)."""

    approvals: tuple[Approval, ...]

"""The broker's operational limits from ``kbs.toml``: deadlines, rate limits, concurrency.

Keys (all optional; README "kbs.toml" is the reference)::

    rpc_deadline_seconds = 20           # receive + handle one request, then DEADLINE_EXCEEDED
    rate_limit_peer_per_second = 500.0  # token bucket per client IP address; 0 turns it off
    rate_limit_peer_burst = 1000
    rate_limit_node_per_second = 5.0    # token bucket per node name in the request; 0: off
    rate_limit_node_burst = 50
    max_inflight_per_peer = 128         # unfinished requests from one client IP address
    max_concurrent_attestations = 16    # enrollment + attestation work at once
    max_queued_attestations = 128       # waiting for a slot; more are refused

The defaults leave ample room for a 10,000-node fleet renewing every 60 s (~170 attestations/s,
two requests each) behind one address, and for tests attesting many times in a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kbs.errors import ConfigError

__all__ = ["DEFAULT_LIMITS", "LIMIT_DEFAULTS", "LimitSettings", "parse_limit_settings"]

LIMIT_DEFAULTS: dict[str, int | float] = {
    "rpc_deadline_seconds": 20,
    "rate_limit_peer_per_second": 500.0,
    "rate_limit_peer_burst": 1000,
    "rate_limit_node_per_second": 5.0,
    "rate_limit_node_burst": 50,
    "max_inflight_per_peer": 128,
    "max_concurrent_attestations": 16,
    "max_queued_attestations": 128,
}
# (minimum, maximum); floats accept integers too
_RANGES: dict[str, tuple[float, float]] = {
    "rpc_deadline_seconds": (0.1, 600),
    "rate_limit_peer_per_second": (0, 1_000_000),
    "rate_limit_peer_burst": (1, 1_000_000),
    "rate_limit_node_per_second": (0, 1_000_000),
    "rate_limit_node_burst": (1, 1_000_000),
    "max_inflight_per_peer": (1, 100_000),
    "max_concurrent_attestations": (1, 1024),
    "max_queued_attestations": (0, 100_000),
}
_FLOATS = frozenset(
    {"rpc_deadline_seconds", "rate_limit_peer_per_second", "rate_limit_node_per_second"}
)


@dataclass(frozen=True)
class LimitSettings:
    rpc_deadline_seconds: float = 20.0
    rate_limit_peer_per_second: float = 500.0
    rate_limit_peer_burst: int = 1000
    rate_limit_node_per_second: float = 5.0
    rate_limit_node_burst: int = 50
    max_inflight_per_peer: int = 128
    max_concurrent_attestations: int = 16
    max_queued_attestations: int = 128


DEFAULT_LIMITS = LimitSettings()


def parse_limit_settings(raw: dict[str, Any], path: Path) -> LimitSettings:
    """The limit keys of a parsed ``kbs.toml`` (other keys are ignored); raises ConfigError."""

    def number(key: str) -> float:
        value = raw.get(key, LIMIT_DEFAULTS[key])
        low, high = _RANGES[key]
        kind = "a number" if key in _FLOATS else "an integer"
        ok_type = isinstance(value, int | float) if key in _FLOATS else isinstance(value, int)
        if isinstance(value, bool) or not ok_type or not low <= value <= high:
            raise ConfigError(
                f"{path}: `{key}` must be {kind} from {_show(low)} to {_show(high)}, got {value!r}"
            )
        return float(value)

    return LimitSettings(
        rpc_deadline_seconds=number("rpc_deadline_seconds"),
        rate_limit_peer_per_second=number("rate_limit_peer_per_second"),
        rate_limit_peer_burst=int(number("rate_limit_peer_burst")),
        rate_limit_node_per_second=number("rate_limit_node_per_second"),
        rate_limit_node_burst=int(number("rate_limit_node_burst")),
        max_inflight_per_peer=int(number("max_inflight_per_peer")),
        max_concurrent_attestations=int(number("max_concurrent_attestations")),
        max_queued_attestations=int(number("max_queued_attestations")),
    )


def _show(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)

"""The firmware's boot event log on this node (``event_log`` in agent.toml): sent with every
attestation, and read again at a restore that no approved state matches, to name the component
that differs (``agent.approvals.choose``)."""

from __future__ import annotations

from pathlib import Path

from agent.errors import StateError
from keylease.api.v1.limits import MAX_EVENT_LOG

__all__ = ["read_event_log"]


def read_event_log(path: Path | None) -> bytes:
    """The log's bytes; ``b""`` when none is configured or the file does not exist. Raises
    StateError when it cannot be read or is larger than the broker accepts."""
    if path is None:
        return b""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_EVENT_LOG + 1)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise StateError(f"cannot read the boot event log {path}: {exc.strerror}") from None
    if len(data) > MAX_EVENT_LOG:
        raise StateError(f"boot event log {path} is larger than {MAX_EVENT_LOG} bytes")
    return data

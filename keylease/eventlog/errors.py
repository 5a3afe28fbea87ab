"""The event-log package's one error root. Messages are operator text; each program turns them
into its own errors at its boundary (the broker: ``EventLogInvalid``/``EventLogMismatch``, refused
``INVALID_ARGUMENT`` or denied; the agent: a restore it cannot explain in components)."""

from __future__ import annotations

__all__ = ["EventLogBankMissing", "EventLogError", "EventLogInvalid"]


class EventLogError(Exception):
    """Root of every error ``keylease.eventlog`` raises."""


class EventLogInvalid(EventLogError):
    """Not a TCG PC Client event log: truncated, garbage, over the size limits."""


class EventLogBankMissing(EventLogError):
    """The log carries no digests of the bank asked for."""

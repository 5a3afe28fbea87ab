"""keylease-agent logging: journald with structured fields under systemd, else plain stderr.

Code logs the usual way and passes the structured fields as ``extra``::

    log.info("node %s: attested", node, extra={"NODE": node, "RESULT": "ok"})
    log.info("restored", extra=log_fields(node, "restored"))

Under systemd each record becomes one journal entry (``SYSLOG_IDENTIFIER=keylease-agent``) whose
MESSAGE has no timestamp (journald adds one) and which carries NODE, KEY, RESULT and REASON as
journal fields (``journalctl -u keylease-agent RESULT=denied``). Only an explicit allowlist of
fields is sent: systemd-python's JournalHandler would otherwise forward every attribute of the log
record. Outside systemd: ``LEVEL logger: message`` on stderr. Never log key material.
systemd-python (the ``agent`` extra) is imported only when a journal handler is made.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "JOURNAL_FIELDS",
    "STDERR_FORMAT",
    "SYSLOG_IDENTIFIER",
    "journal_handler",
    "journal_wanted",
    "log_fields",
    "setup_logging",
]

SYSLOG_IDENTIFIER: Final = "keylease-agent"
JOURNAL_FIELDS: Final = ("NODE", "KEY", "RESULT", "REASON")
"""The structured fields the agent's code passes through ``extra=``."""

STDERR_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"

# What systemd-python's JournalHandler.emit passes that is worth keeping, besides MESSAGE.
_HANDLER_FIELDS: Final = frozenset(
    {
        "PRIORITY",
        "LOGGER",
        "THREAD_NAME",
        "PROCESS_NAME",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "MESSAGE_ID",
        "SYSLOG_IDENTIFIER",
        "EXCEPTION_TEXT",
    }
)
_SENT_FIELDS: Final = _HANDLER_FIELDS | frozenset(JOURNAL_FIELDS)

# Third-party loggers that dump whole protocol messages at DEBUG, and pyroute2's traffic-control
# module, which warns at import when /proc/net/psched is hidden (ProcSubset=pid in the unit).
_QUIET: Final = {
    "pyroute2": logging.WARNING,
    "asyncio": logging.WARNING,
    "pyroute2.netlink.rtnl.tcmsg": logging.ERROR,
}


def log_fields(node: str, result: str, reason: str = "") -> dict[str, str]:
    """``extra=`` for one protocol step's log line: the NODE, its RESULT and the REASON."""
    return {"NODE": node, "RESULT": result, "REASON": reason}


def journal_handler() -> logging.Handler:
    """A systemd.journal.JournalHandler sending MESSAGE (no timestamp), PRIORITY, the code location,
    SYSLOG_IDENTIFIER=keylease-agent and the NODE/KEY/RESULT/REASON fields given via ``extra``."""
    import systemd.journal as sd_journal  # the agent extra, imported only to log to the journal

    def send(MESSAGE: str, **fields: Any) -> None:
        """Forward one record to journald with only the allowlisted fields (None values dropped)."""
        kept = {k: v for k, v in fields.items() if k in _SENT_FIELDS and v is not None}
        sd_journal.send(MESSAGE, **kept)

    handler: logging.Handler = sd_journal.JournalHandler(
        SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER, sender_function=send
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def setup_logging(*, verbose: bool, journal: bool) -> None:
    """Configure the root logger once (again on reload): journald or stderr, INFO or DEBUG."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    if journal:
        root.addHandler(journal_handler())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(level)


def journal_wanted(environ: Mapping[str, str]) -> bool:
    """True when systemd connected our stderr to the journal: ``JOURNAL_STREAM`` is set and names
    the device and inode of file descriptor 2 (see systemd.exec(5))."""
    value = environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))

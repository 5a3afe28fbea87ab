"""systemd service notification (sd_notify through systemd-python): READY, STATUS, WATCHDOG.

The CLI decides from the environment whether notification is wanted (``NOTIFY_SOCKET``) and what
the watchdog interval is (``WATCHDOG_USEC`` for this PID); nothing here reads the environment.
Outside systemd a disabled ``Notifier`` does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import systemd.daemon as sd_daemon

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, *, enabled: bool, watchdog_usec: int | None = None) -> None:
        self.enabled = enabled
        self.watchdog_interval = watchdog_usec / 1e6 if enabled and watchdog_usec else None
        self.is_ready = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int) -> Notifier:
        usec = environ.get("WATCHDOG_USEC", "")
        for_us = environ.get("WATCHDOG_PID", str(pid)) == str(pid)
        return cls(
            enabled=bool(environ.get("NOTIFY_SOCKET")),
            watchdog_usec=int(usec) if usec.isdigit() and for_us else None,
        )

    def _send(self, *lines: str) -> None:
        if not self.enabled:
            return
        text = "\n".join(line.replace("\n", " ") for line in lines)
        try:
            sd_daemon.notify(text)
        except OSError as exc:  # the manager went away; nothing useful to do but say so
            log.warning("sd_notify failed: %s", exc.strerror)

    def ready(self, status: str) -> None:
        self.is_ready = True
        self._send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        if self.watchdog_interval is not None:
            self._send("WATCHDOG=1")

    def reloading(self) -> None:
        self._send("RELOADING=1", "STATUS=reloading the configuration")

    def reloaded(self, status: str) -> None:
        self._send("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1", "STATUS=stopping")

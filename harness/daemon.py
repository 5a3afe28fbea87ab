"""`keylease-agent run` as a real subprocess, with a test-owned NOTIFY_SOCKET (what systemd does
for a Type=notify service). No pytest imports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.broker import AGENT

__all__ = ["AgentDaemon", "Notification", "NotifySocket", "faketime"]

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def faketime(offset: str) -> tuple[str, ...]:
    """A command prefix running the agent with its wall clock moved by ``offset`` ("+3650d",
    "-3650d"; Debian's libfaketime, package faketime), and nothing else's: ``env`` execs the
    agent itself (``faketime`` would fork, and a signal would stop it, not the agent)."""
    if not LIBFAKETIME.exists():
        raise RuntimeError(f"{LIBFAKETIME} is missing: apt-get install faketime")
    return ("env", f"LD_PRELOAD={LIBFAKETIME}", f"FAKETIME={offset}", "FAKETIME_DONT_RESET=1")


@dataclass(frozen=True)
class Notification:
    at: float  # time.monotonic() on receipt
    fields: dict[str, str]
    observed: object  # what the socket's probe saw at that very moment


class NotifySocket:
    """A datagram socket collecting sd_notify messages; ``probe`` runs at each receipt."""

    def __init__(self, path: Path, probe: Callable[[], object] = lambda: None) -> None:
        self.path = path
        self.probe = probe
        self.messages: list[Notification] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            observed = self.probe()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append(Notification(at, fields, observed))
                self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[Notification], bool], timeout: float
    ) -> Notification | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def ready(self, timeout: float) -> Notification | None:
        return self.wait_for(lambda m: m.fields.get("READY") == "1", timeout)

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AgentDaemon:
    """``keylease-agent --config CONFIG run`` in the background; output goes to ``log_path``.

    ``wrapper`` runs it under another command (``strace ...``, ``unshare ...``: see
    ``harness.faults``), ``env`` adds to its environment."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        notify: NotifySocket | None = None,
        wrapper: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.log_path = log_path
        self.notify = notify
        self.wrapper = list(wrapper)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> AgentDaemon:
        env = dict(os.environ, TSS2_LOG="esys+none", **self.env)
        env.pop("NOTIFY_SOCKET", None)
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = str(self.notify.path)
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                [*self.wrapper, AGENT, "--config", str(self.config), "run"],
                stdout=log,
                stderr=log,
                env=env,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM and wait; returns the exit code (raises TimeoutExpired if it hangs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> AgentDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

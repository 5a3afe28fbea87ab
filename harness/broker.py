"""A real broker for tests and the demo: `keylease-kbs init` + `serve` as a subprocess on
127.0.0.1:0 over TLS, and helpers to run the two CLIs. No pytest imports (the demo uses it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "AGENT",
    "KBS",
    "Broker",
    "CliResult",
    "cpu_seconds",
    "pg_broker",
    "write_agent_config",
]

BIN = Path(sys.executable).parent
AGENT = str(BIN / "keylease-agent")
KBS = str(BIN / "keylease-kbs")


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    def __repr__(self) -> str:
        return f"<exit {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr}>"


def run(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60) -> CliResult:
    full_env = dict(os.environ, TSS2_LOG="esys+none", **(env or {}))
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=full_env, check=False
    )
    return CliResult(proc)


class Broker:
    """``keylease-kbs init`` into ``directory``, then ``serve`` in the background."""

    def __init__(
        self,
        directory: Path,
        ek_roots: Path,
        enrollment: str = "manual",
        lease_seconds: int = 0,
        nofile: int | None = None,
    ) -> None:
        """``nofile``: the broker's RLIMIT_NOFILE (soft and hard), as systemd's LimitNOFILE=;
        ``wrapper``, set before ``start``: a command the broker runs under (``harness.faults``)."""
        self.directory = directory
        self.nofile = nofile
        self.wrapper: list[str] = []
        self.config = directory / "kbs.toml"
        self.log_path = directory / "kbs.log"
        self.address = ""
        self._proc: subprocess.Popen[bytes] | None = None
        result = run(
            [
                KBS,
                "init",
                str(directory),
                "--listen",
                "127.0.0.1:0",
                "--ek-roots",
                str(ek_roots),
                "--enrollment",
                enrollment,
            ]
        )
        if result.returncode != 0:
            raise RuntimeError(f"keylease-kbs init failed: {result!r}")
        self.init_output = result.stdout
        if lease_seconds:
            text = self.config.read_text()
            lines = [ln for ln in text.splitlines() if not ln.startswith("lease_seconds")]
            self.config.write_text("\n".join([*lines, f"lease_seconds = {lease_seconds}", ""]))

    @property
    def ca(self) -> Path:
        return self.directory / "agent-ca.pem"

    def start(self, timeout: float = 20) -> None:
        ready = self.directory / "ready"
        ready.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        limit = [f"--nofile={self.nofile}:{self.nofile}"] if self.nofile else []
        self._proc = subprocess.Popen(
            [
                *self.wrapper,
                *(["prlimit", *limit] if limit else []),
                KBS,
                "--config",
                str(self.config),
                "serve",
                "--ready-file",
                str(ready),
            ],
            stdout=log,
            stderr=log,
            env=dict(os.environ, TSS2_LOG="esys+none"),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self._proc.poll() is not None:
                raise RuntimeError(f"broker exited {self._proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"broker not ready after {timeout} s: {self.log()}")
            time.sleep(0.02)
        self.address = ready.read_text().strip()

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def set(self, **settings: float | str) -> None:
        """Rewrite top-level kbs.toml settings (the broker reads them at start)."""
        lines = self.config.read_text().splitlines()
        for key, value in settings.items():
            text = f'"{value}"' if isinstance(value, str) else str(value)
            lines = [ln for ln in lines if not ln.startswith(f"{key} ")] + [f"{key} = {text}"]
        self.config.write_text("\n".join([*lines, ""]))

    def restart(self, **settings: float | str) -> None:
        """Stop, change settings, start again on the same port (agents keep their config)."""
        if self.address:
            self.set(listen=self.address)
        self.stop()
        self.set(**settings)
        self.start()

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the broker is not running")
        return self._proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time the broker process has used so far (from /proc)."""
        return cpu_seconds(self.pid)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kbs(self, *args: str) -> CliResult:
        return run([KBS, "--config", str(self.config), *args])

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_agent_config(
    path: Path,
    *,
    broker: Broker,
    tcti: str,
    state_dir: Path,
    key_dirs: Sequence[Path],
    node_name: str,
    extra_lines: Sequence[str] = (),
    event_log: Path | None = None,
    address: str = "",
) -> Path:
    """``address``: where the agent reaches the broker (default: the broker's own address)."""
    path.write_text(
        "\n".join(
            [
                f'kbs = "{address or broker.address}"',
                f'kbs_ca = "{broker.ca}"',
                f'tcti = "{tcti}"',
                f'state_dir = "{state_dir}"',
                f'node_name = "{node_name}"',
                "key_dirs = [" + ", ".join(f'"{d}"' for d in key_dirs) + "]",
                f'event_log = "{event_log or ""}"',
                *extra_lines,
                "",
            ]
        )
    )
    return path


def agent(config: Path, *args: str) -> CliResult:
    return run([AGENT, "--config", str(config), *args])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pg_broker(directory: Path, ek_roots: Path, url: str, like: Broker | None = None) -> Broker:
    """A broker on ``url``; ``like``: share that broker's TLS identity and master key."""
    broker = Broker(directory, ek_roots)
    if like is not None:
        for name in ("tls", "master.key", "agent-ca.pem"):
            src, dst = like.directory / name, directory / name
            if src.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
            elif src.exists():
                shutil.copy2(src, dst)
    broker.set(database=url)
    return broker

"""Real software TPMs for tests and the demo: a local TPM-manufacturer CA, provisioning with EK
certificates (``swtpm_setup``), and ``swtpm socket`` processes on a Unix socket.

No pytest imports: the demo uses this module too. Nothing here touches /var/lib/swtpm-localca or
the user's swtpm configuration: every config file lives in the CA's own directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["Swtpm", "SwtpmCa", "SwtpmToolMissing", "copy_state", "provision", "require_tools"]

TOOLS = ("swtpm", "swtpm_setup", "swtpm_localca", "certtool")
STATE_FILE = "tpm2-00.permall"
SOCKET = "tpm.sock"
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; leave room for the ".ctrl" suffix's NUL
START_TIMEOUT = 10.0


class SwtpmToolMissing(RuntimeError):
    """A swtpm binary is not installed."""


def require_tools() -> None:
    """Raise SwtpmToolMissing naming every missing binary and the packages that provide them."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise SwtpmToolMissing(
            f"missing {', '.join(missing)}: install the Debian packages swtpm, swtpm-tools and "
            "gnutls-bin (apt-get install -y swtpm swtpm-tools gnutls-bin)"
        )


class SwtpmCa:
    """A local TPM-manufacturer CA (root + intermediate) created by ``swtpm_localca``.

    The CA is created eagerly by provisioning ``golden``, a TPM state every default test TPM is
    copied from (copies share the golden TPM's EK).
    """

    def __init__(self, directory: Path) -> None:
        require_tools()
        self.directory = directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.localca_config = self.directory / "swtpm-localca.conf"
        self.localca_options = self.directory / "swtpm-localca.options"
        self.setup_config = self.directory / "swtpm_setup.conf"
        d = self.directory
        self.localca_config.write_text(
            f"statedir = {d}\n"
            f"signingkey = {d / 'signkey.pem'}\n"
            f"issuercert = {d / 'issuercert.pem'}\n"
            f"certserial = {d / 'certserial'}\n"
        )
        self.localca_options.write_text(
            "--platform-manufacturer keylease-tests\n"
            "--platform-version 2.1\n"
            "--platform-model swtpm\n"
        )
        self.setup_config.write_text(
            f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
            f"create_certs_tool_config = {self.localca_config}\n"
            f"create_certs_tool_options = {self.localca_options}\n"
            "active_pcr_banks = sha256\n"
        )
        self.golden = d / "golden"
        provision(self.golden, self)

    @property
    def root_cert(self) -> Path:
        return self.directory / "swtpm-localca-rootca-cert.pem"

    @property
    def intermediate_cert(self) -> Path:
        return self.directory / "issuercert.pem"

    def bundle_pem(self) -> bytes:
        """Root and intermediate certificates, PEM: the broker's ``ek_roots`` bundle."""
        root = self.root_cert.read_bytes()
        intermediate = self.intermediate_cert.read_bytes()
        return root.rstrip(b"\n") + b"\n" + intermediate.rstrip(b"\n") + b"\n"


def provision(state_dir: Path, ca: SwtpmCa) -> None:
    """Manufacture a TPM in ``state_dir``: RSA-2048 and ECC EKs with certificates signed by
    ``ca``, a platform certificate, and only the sha256 PCR bank active."""
    require_tools()
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / "swtpm_setup.log"
    proc = subprocess.run(
        [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(state_dir),
            "--config",
            str(ca.setup_config),
            "--create-ek-cert",
            "--create-platform-cert",
            "--overwrite",
            "--logfile",
            str(log),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        details = log.read_text(errors="replace") if log.exists() else ""
        raise RuntimeError(
            f"swtpm_setup failed for {state_dir} (exit {proc.returncode}):\n"
            f"{proc.stdout}{proc.stderr}{details}"
        )


class Swtpm:
    """``swtpm socket`` on ``state_dir/tpm.sock`` (control channel at ``tpm.sock.ctrl``).

    A context manager: entering starts it (if not running), leaving stops it.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.socket = self.state_dir / SOCKET
        self.ctrl_socket = self.state_dir / f"{SOCKET}.ctrl"
        self.log_path = self.state_dir / "swtpm.log"
        self.tcti = f"swtpm:path={self.socket}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        if len(os.fsencode(self.ctrl_socket)) > MAX_SOCKET_PATH:
            raise RuntimeError(
                f"swtpm socket path {self.ctrl_socket} is too long for a Unix socket; "
                "use a shorter state directory"
            )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start swtpm and wait until both sockets accept connections."""
        if self.running:
            return
        require_tools()
        if not (self.state_dir / STATE_FILE).exists():
            raise RuntimeError(f"{self.state_dir} holds no TPM state; provision it first")
        for path in (self.socket, self.ctrl_socket):
            path.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child, closed in stop)
        self._proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--server",
                f"type=unixio,path={self.socket}",
                "--ctrl",
                f"type=unixio,path={self.ctrl_socket}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        pending = [self.socket, self.ctrl_socket]
        while pending:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise RuntimeError(
                    f"swtpm exited with {code} while starting; see {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            if _accepts(pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"swtpm did not listen on {self.socket} within {timeout}s")
            time.sleep(0.002)

    def stop(self) -> None:
        """Terminate swtpm (its state stays in ``state_dir``)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        """Stop and start on the same state: a reboot (PCRs reset, resetCount moves on)."""
        self.stop()
        self.start()

    def __enter__(self) -> Swtpm:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Swtpm({self.state_dir}, running={self.running})"


def _accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False
    return True


def copy_state(source: Path, state_dir: Path) -> None:
    """Copy a provisioned TPM state (the same TPM, same EK) into ``state_dir``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / STATE_FILE, state_dir / STATE_FILE)

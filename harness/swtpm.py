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
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = [
    "EK_ECC256_CERT_INDEX",
    "Swtpm",
    "SwtpmCa",
    "SwtpmToolMissing",
    "copy_state",
    "provision",
    "provision_ecc256",
    "require_tools",
    "set_clock",
]

TOOLS = ("swtpm", "swtpm_setup", "swtpm_localca", "certtool")
STATE_FILE = "tpm2-00.permall"
SOCKET = "tpm.sock"
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; leave room for the ".ctrl" suffix's NUL
START_TIMEOUT = 10.0
EK_ECC256_CERT_INDEX = 0x01C0000A  # TCG EK profile: the low-range ECC NIST P-256 EK certificate


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


def provision(
    state_dir: Path, ca: SwtpmCa, banks: Sequence[str] = ("sha256",), *, ek_certs: bool = True
) -> None:
    """Manufacture a TPM in ``state_dir``: RSA-2048 and ECC P-384 EKs with certificates signed by
    ``ca`` and a platform certificate (``ek_certs``), and only ``banks`` active."""
    require_tools()
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / "swtpm_setup.log"
    certs = ["--create-ek-cert", "--create-platform-cert"] if ek_certs else []
    proc = subprocess.run(
        [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(state_dir),
            "--config",
            str(ca.setup_config),
            *certs,
            "--pcr-banks",
            ",".join(banks),
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
        while not _answers(self.socket):  # its TPM2_Startup done (and written to its state)
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"swtpm did not answer a command within {timeout}s")
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


# TPM2_ReadClock: tag TPM_ST_NO_SESSIONS, size 10, command code 0x181.
_READ_CLOCK = bytes.fromhex("80010000000a00000181")


def _answers(path: Path) -> bool:
    """Whether the TPM on ``path`` answers TPM2_ReadClock with success. swtpm listens before
    its TPM2_Startup (``--flags startup-clear``) has run: a restart stopped before then is no
    reboot at all (resetCount does not move on in its state file)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(path))
            sock.sendall(_READ_CLOCK)
            head = sock.recv(10)
    except OSError:
        return False
    return len(head) == 10 and int.from_bytes(head[6:10], "big") == 0


def set_clock(tcti: str, clock: int) -> None:
    """TPM2_ClockSet with owner authorization: the TPM's clock (ms) moves forward to ``clock``
    (a TPM refuses to move it back). swtpm does not keep it across a restart."""
    from tpm2_pytss import ESAPI, TCTILdr

    with TCTILdr.parse(tcti) as loader, ESAPI(loader) as esys:
        esys.clock_set(new_time=clock)


def copy_state(source: Path, state_dir: Path) -> None:
    """Copy a provisioned TPM state (the same TPM, same EK) into ``state_dir``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / STATE_FILE, state_dir / STATE_FILE)


def provision_ecc256(state_dir: Path, ca: SwtpmCa, banks: Sequence[str] = ("sha256",)) -> None:
    """A TPM whose only EK certificate is for the ECC P-256 EK, at NV 0x01c0000a, as many
    hardware TPMs ship: swtpm_setup itself writes RSA-2048 and P-384 certificates only, so this
    creates the EK from the TCG template, has ``ca``'s intermediate certify it (EKU
    2.23.133.8.1, the TPM attributes swtpm_localca puts in the subjectAltName) and writes the
    certificate to its NV index."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from tpm2_pytss import (
        ESAPI,
        ESYS_TR,
        TPM2_ECC,
        TPM2B_NV_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMA_NV,
        TPMS_NV_PUBLIC,
        TCTILdr,
    )
    from tpm2_pytss.constants import TPM2_ALG
    from tpm2_pytss.utils import NVReadEK, create_ek_template

    provision(state_dir, ca, banks, ek_certs=False)
    issuer = x509.load_pem_x509_certificate(ca.intermediate_cert.read_bytes())
    signer = serialization.load_pem_private_key((ca.directory / "signkey.pem").read_bytes(), None)
    assert isinstance(signer, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    with Swtpm(state_dir) as tpm, TCTILdr.parse(tpm.tcti) as loader, ESAPI(loader) as esys:
        _, template = create_ek_template("EK-ECC256", NVReadEK(esys))
        handle, public, *_ = esys.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        esys.flush_context(handle)
        point = public.publicArea.unique.ecc
        assert public.publicArea.parameters.eccDetail.curveID == TPM2_ECC.NIST_P256
        key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(bytes(point.x), "big"), int.from_bytes(bytes(point.y), "big"),
            ec.SECP256R1(),
        ).public_key()  # fmt: skip
        tpm_attrs = x509.Name(
            [
                x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:00001014"),
                x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "swtpm"),
                x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.3"), "id:20191023"),
            ]
        )
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(issuer.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm_attrs)]), True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier("2.23.133.8.1")]), False)
            .add_extension(
                x509.KeyUsage(False, False, False, False, True, False, False, False, False), True
            )
            .sign(signer, hashes.SHA256())
        ).public_bytes(serialization.Encoding.DER)
        nv = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=EK_ECC256_CERT_INDEX,
                nameAlg=TPM2_ALG.SHA256,
                attributes=TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD
                | TPMA_NV.NO_DA | TPMA_NV.PPREAD,
                dataSize=len(cert),
            )
        )  # fmt: skip
        index = esys.nv_define_space(None, nv, ESYS_TR.OWNER)
        for offset in range(0, len(cert), 512):
            esys.nv_write(index, cert[offset : offset + 512], offset, ESYS_TR.OWNER)

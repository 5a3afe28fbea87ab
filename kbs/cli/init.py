"""``keylease-kbs init DIR``: a new broker directory.

Writes ``kbs.toml`` (every key on its own ``key = value`` line), ``master.key`` (32 random bytes,
0600), ``tls/`` (CA, server certificate and the release-signing key and certificate, keys 0600),
``agent-ca.pem`` (the CA agents trust) and,
with ``--ek-roots``, a copy of the EK root bundle as ``ek-roots.pem``. Refuses to overwrite any of
them: a new master key would make every stored image key undecryptable. If a step fails, the
files written so far are removed again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kbs.cli.parser import Handler
from kbs.config import EnrollmentMode, parse_listen
from kbs.errors import ConfigError, OperatorError
from kbs.masterkey import new_master_key
from kbs.signing import create_signing_files
from kbs.tls import PkiFiles, init_pki, server_names
from kbs.tpm.ekcert import load_ek_roots

__all__ = ["COMMANDS", "InitResult", "init_broker"]


@dataclass(frozen=True)
class InitResult:
    config: Path
    agent_ca: Path
    agent_kbs: str  # the agent's `kbs = "..."` value
    ek_roots_copied: bool
    notes: tuple[str, ...]


def _config_text(listen: str, enrollment: EnrollmentMode) -> str:
    return "\n".join(
        [
            "# keylease-kbs configuration, written by `keylease-kbs init`.",
            "# Relative paths are relative to this file. See README.md, section kbs.toml.",
            f'listen = "{listen}"',
            'database = "kbs.db"',
            'tls_cert = "tls/server.pem"',
            'tls_key = "tls/server-key.pem"',
            'master_key = "master.key"',
            'signing_key = "tls/signing-key.pem"',
            'signing_cert = "tls/signing.pem"',
            'ek_roots = "ek-roots.pem"',
            f'enrollment = "{enrollment.value}"',
            "nonce_ttl_seconds = 60",
            "lease_seconds = 3600",
            "enrollment_ttl_seconds = 300",
            *(['metrics_listen = "127.0.0.1:0"'] if listen.endswith(":0") else []),
            # The admin API (mutual TLS; `keylease-kbs admin-cert issue`); "" turns it off.
            f'admin_listen = "127.0.0.1:{0 if listen.endswith(":0") else 8444}"',
            "",
        ]
    )


def _host_name() -> str:
    """This machine's name as agents should reach it: the FQDN unless that is only localhost."""
    fqdn = socket.getfqdn()
    if fqdn.split(".")[0] in ("localhost", "") or fqdn.startswith("localhost."):
        return socket.gethostname()
    return fqdn


def _agent_address(host: str, port: int, fqdn: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        shown = host
    else:
        shown = fqdn if ip.is_unspecified else (f"[{ip}]" if ip.version == 6 else str(ip))
    return f"{shown}:{port if port else 'PORT'}"


class _Writer:
    """Creates files exclusively and remembers them, so a failed init can be undone."""

    def __init__(self) -> None:
        self.created: list[Path] = []

    def write(self, path: Path, data: bytes, mode: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        self.created.append(path)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)

    def undo(self) -> None:
        for path in reversed(self.created):
            if path.is_dir():
                for child in path.iterdir():
                    child.unlink(missing_ok=True)
                path.rmdir()
            else:
                path.unlink(missing_ok=True)


def _signing_files(files: PkiFiles, tls_dir: Path) -> None:
    """The release-signing key and certificate, issued by the CA ``init_pki`` just wrote."""
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    create_signing_files(
        ca, ca_key, tls_dir / "signing-key.pem", tls_dir / "signing.pem", dt.datetime.now(dt.UTC)
    )


def init_broker(
    directory: Path, *, listen: str, ek_roots: Path | None, enrollment: EnrollmentMode
) -> InitResult:
    """Create a broker directory; raises ConfigError (bad input) or OperatorError (exists)."""
    directory = directory.absolute()
    host, port = parse_listen(listen, "--listen")
    if ek_roots is not None:
        load_ek_roots(ek_roots, "--ek-roots")  # the bundle `serve` will have to accept
    targets = ["kbs.toml", "master.key", "tls", "agent-ca.pem", "kbs.db"]
    if ek_roots is not None:
        targets.append("ek-roots.pem")
    existing = [name for name in targets if (directory / name).exists()]
    if existing:
        raise OperatorError(
            f"{directory} already holds {', '.join(existing)}; init refuses to overwrite a "
            "broker (a new master key would make its stored keys undecryptable). Choose an "
            "empty directory"
        )
    fqdn = _host_name()
    hosts = [host, fqdn, socket.getfqdn(), socket.gethostname()]
    writer = _Writer()
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        writer.write(directory / "master.key", new_master_key().reveal(), 0o600)
        tls_dir = directory / "tls"
        tls_dir.mkdir(mode=0o700)
        writer.created.append(tls_dir)
        files = init_pki(tls_dir, hosts)
        _signing_files(files, tls_dir)
        writer.write(directory / "agent-ca.pem", files.ca_cert.read_bytes(), 0o644)
        if ek_roots is not None:
            writer.write(directory / "ek-roots.pem", ek_roots.read_bytes(), 0o644)
        writer.write(directory / "kbs.toml", _config_text(listen, enrollment).encode(), 0o644)
    except OSError as exc:
        writer.undo()
        raise ConfigError(f"cannot write {exc.filename or directory}: {exc.strerror}") from None
    except BaseException:
        writer.undo()
        raise
    notes = []
    if ek_roots is None:
        notes.append(
            f"no --ek-roots given: put the TPM manufacturers' root certificates (PEM) in "
            f"{directory / 'ek-roots.pem'} before `serve`"
        )
    if port == 0:
        notes.append("listen port 0: the broker picks a free port each time it starts")
    names = server_names(hosts)
    notes.append(f"the server certificate is valid for {', '.join(names)}")
    return InitResult(
        config=directory / "kbs.toml",
        agent_ca=directory / "agent-ca.pem",
        agent_kbs=_agent_address(host, port, fqdn),
        ek_roots_copied=ek_roots is not None,
        notes=tuple(notes),
    )


def cmd_init(args: argparse.Namespace) -> int:
    result = init_broker(
        args.directory,
        listen=args.listen,
        ek_roots=args.ek_roots,
        enrollment=EnrollmentMode(args.enrollment),
    )
    directory = result.config.parent
    print(f"wrote {result.config}, {directory / 'master.key'} (0600), {directory / 'tls'}/,")
    print(
        f"  {result.agent_ca}"
        + (f", {directory / 'ek-roots.pem'}" if result.ek_roots_copied else "")
    )
    print("keep master.key secret and backed up: it encrypts every stored image key")
    for note in result.notes:
        print(f"note: {note}")
    print(f"next: keylease-kbs --config {result.config} check-config")
    print("agent config lines (copy agent-ca.pem to each node):")
    print(f'kbs = "{result.agent_kbs}"')
    print(f'kbs_ca = "{result.agent_ca}"')
    return 0


COMMANDS: dict[str, Handler] = {"init": cmd_init}

"""The broker's TLS credentials: a private CA and a server certificate (``init``), and the one
loader that reads and checks them (``serve`` and ``check-config`` alike).

``init_pki`` writes, under ``tls_dir``: ``ca.pem`` / ``ca-key.pem`` (ECDSA P-256, 10 years) and
``server.pem`` (server certificate followed by the CA) / ``server-key.pem``. Keys are mode 0600.
Agents trust ``ca.pem`` (``init`` copies it to ``agent-ca.pem``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kbs.errors import ConfigError
from keylease.certificates import MALFORMED

__all__ = [
    "CA_KEY_USAGE",
    "SIGNATURE_KEY_USAGE",
    "PkiFiles",
    "ServerCredentials",
    "init_pki",
    "issue_leaf",
    "key_pem",
    "load_credentials",
    "read_config_file",
    "server_names",
    "write_new_file",
]

_VALIDITY = dt.timedelta(days=3650)
# A certificate authority's key usage: it signs certificates and CRLs, nothing else.
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
# A leaf certificate that signs (TLS handshakes, releases), nothing else.
SIGNATURE_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)  # fmt: skip
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*")


@dataclass(frozen=True)
class PkiFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class ServerCredentials:
    key_pem: bytes
    chain_pem: bytes
    not_after: dt.datetime
    names: tuple[str, ...]


def server_names(hosts: Sequence[str]) -> list[str]:
    """The SAN entries for the server certificate: loopback, ``localhost`` and ``hosts``
    (unspecified addresses such as 0.0.0.0 and names that are not valid DNS names are skipped)."""
    names = ["127.0.0.1", "::1", "localhost"]
    for host in hosts:
        host = host.strip("[]").rstrip(".")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if _DNS_NAME.fullmatch(host):
                names.append(host.lower())
            continue
        if not ip.is_unspecified:
            names.append(str(ip))
    return list(dict.fromkeys(names))


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwrite) with ``mode`` set before any byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (the files are mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def issue_leaf(
    ca: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    key: ec.EllipticCurvePublicKey,
    start: dt.datetime,
    end: dt.datetime,
    *extensions: tuple[x509.ExtensionType, bool],
) -> x509.Certificate:
    """A certificate that is not a CA (basicConstraints CA:FALSE, critical) for ``key``, issued
    by ``ca`` with a random serial, valid from ``start`` to ``end``, with ``extensions`` (each
    with whether it is critical) in that order: the broker's TLS server, operators' admin and
    the release-signing certificates."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(ca_key, hashes.SHA256())


def init_pki(tls_dir: Path, hosts: Sequence[str]) -> PkiFiles:
    """Create the CA and the server certificate in ``tls_dir`` (created 0700; files must not
    exist). Raises ConfigError if a file cannot be written."""
    files = PkiFiles(
        ca_cert=tls_dir / "ca.pem",
        ca_key=tls_dir / "ca-key.pem",
        server_cert=tls_dir / "server.pem",
        server_key=tls_dir / "server-key.pem",
    )
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(hours=1), now + _VALIDITY
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keylease-kbs CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            CA_KEY_USAGE,
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    names = server_names(hosts)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue_leaf(
        ca_name, ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keylease-kbs")]),
        server_key.public_key(), start, end,
        (SIGNATURE_KEY_USAGE, True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (_san(names), False),
        (x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), False),
        (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False),
    )  # fmt: skip
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    try:
        tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_new_file(files.ca_key, key_pem(ca_key), 0o600)
        write_new_file(files.ca_cert, ca_pem, 0o644)
        write_new_file(files.server_key, key_pem(server_key), 0o600)
        write_new_file(
            files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM) + ca_pem, 0o644
        )
    except OSError as exc:
        raise ConfigError(f"cannot write TLS files in {tls_dir}: {exc.strerror}") from None
    return files


def read_config_file(path: Path, key: str, missing: str = "") -> tuple[bytes, int]:
    """The bytes (at most 1 MiB) and permission bits of the file config key ``key`` names;
    ConfigError if it cannot be read (``missing``: what to do when it does not exist)."""
    try:
        with path.open("rb") as f:
            return f.read(1 << 20), stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    except FileNotFoundError:
        raise ConfigError(
            f"{key} {path} does not exist; "
            + (missing or f"`keylease-kbs init` writes it, or point {key} at your own PEM file")
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {key} {path}: {exc.strerror}") from None


def load_credentials(cert_path: Path, key_path: Path) -> ServerCredentials:
    """Read and check a certificate chain and its private key (PEM); raises ConfigError."""
    chain_pem, _ = read_config_file(cert_path, "tls_cert")
    key_pem, mode = read_config_file(key_path, "tls_key")
    if mode & 0o077:
        raise ConfigError(
            f"tls_key {key_path} is readable by other users (mode {mode:04o}); "
            f"run `chmod 600 {key_path}`"
        )
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except MALFORMED:
        raise ConfigError(
            f"tls_cert {cert_path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            f"tls_key {key_path} is encrypted; the broker needs an unencrypted PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"tls_key {key_path} is not a usable PEM private key: {exc}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != chain[0].public_key().public_bytes(der, spki):
        raise ConfigError(
            f"tls_key {key_path} does not belong to the first certificate in tls_cert {cert_path}; "
            "put the server certificate first and use its own key"
        )
    leaf = chain[0]
    if leaf.not_valid_after_utc < dt.datetime.now(dt.UTC):
        raise ConfigError(
            f"tls_cert {cert_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d}; issue a new "
            "server certificate"
        )
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(v) for v in san.get_values_for_type(x509.DNSName)) + tuple(
            str(v) for v in san.get_values_for_type(x509.IPAddress)
        )
    except x509.ExtensionNotFound:
        names = ()
    return ServerCredentials(
        key_pem=key_pem, chain_pem=chain_pem, not_after=leaf.not_valid_after_utc, names=names
    )

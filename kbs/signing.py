"""The broker's release-signing key: every release it sends is signed (``keylease.api.v1.signing``
says what is signed and which certificate may sign it).

``signing_key`` (ECDSA P-256, PEM, mode 0600 like ``master.key``) and ``signing_cert`` (its
certificate, issued by the broker's CA ``admin_ca`` — ``tls/ca.pem``, which agents trust as
``agent-ca.pem`` — with ``OU=keylease-signing``) are written by ``init`` into ``tls/``, or by
``keylease-kbs signing-key create`` for a broker directory made before releases were signed.
``load_signer`` is the one loader (``serve`` and ``check-config``): it checks the certificate
exactly as agents will, so a broker never starts with a key whose releases agents would refuse.
ECDSA P-256 because a TPM can verify it too (TPM2_VerifySignature): a release's sealed object is
bound with PolicyAuthorize to this key (``keylease.api.v1.tpmpolicy``), and the approvals that open
it are signed with it (``kbs.approvals``).

``previous_signing_keys`` are older release-signing keys, each a PEM file holding its certificate
and key (0600), written by ``signing-key create --replace``: caches released before a rotation
stay bound to the older key, so approvals for them are signed with it while it is kept.
``load_signing_keys`` loads the current key and those.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kbs.config import KbsConfig
from kbs.errors import ConfigError, OperatorError
from kbs.tls import SIGNATURE_KEY_USAGE, issue_leaf, key_pem, read_config_file, write_new_file
from keylease.api.v1.signing import SIGNATURE_ALGORITHM, SIGNING_OU, signing_certificate
from keylease.certificates import MALFORMED

__all__ = [
    "SIGNING_VALIDITY",
    "ReleaseSigner",
    "SigningKeys",
    "create_signing_files",
    "load_signer",
    "load_signing_keys",
]

SIGNING_VALIDITY = dt.timedelta(days=3650)
_CREATE = "keylease-kbs signing-key create"


@dataclass(frozen=True, repr=False)
class ReleaseSigner:
    """Signs releases; ``certificate`` (DER) travels with each one. ``repr`` shows no key."""

    key: ec.EllipticCurvePrivateKey
    certificate: bytes
    not_after: dt.datetime

    def sign(self, payload: bytes) -> bytes:
        return self.key.sign(payload, SIGNATURE_ALGORITHM)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate (hex): which key a node's cache is bound to."""
        return hashlib.sha256(self.certificate).hexdigest()

    def __repr__(self) -> str:
        return "ReleaseSigner(<redacted>)"


@dataclass(frozen=True)
class SigningKeys:
    """The current release-signing key and the previous ones still kept."""

    current: ReleaseSigner
    previous: tuple[ReleaseSigner, ...] = ()

    def by_fingerprint(self, fingerprint: str) -> ReleaseSigner | None:
        return next(
            (s for s in (self.current, *self.previous) if s.fingerprint == fingerprint), None
        )


def _read(path: Path, key: str) -> tuple[bytes, int]:
    return read_config_file(
        path,
        key,
        "releases are signed since this version: create the release-signing key and certificate "
        f"with `{_CREATE}` (on the host holding the broker's CA key), or point `signing_key`/"
        "`signing_cert` in kbs.toml at them",
    )


def _ca(cfg: KbsConfig) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cfg.admin_ca.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read admin_ca {cfg.admin_ca}: {exc.strerror}") from None
    except MALFORMED:
        raise ConfigError(f"admin_ca {cfg.admin_ca} is not a PEM certificate") from None


def load_signer(cfg: KbsConfig, now: dt.datetime | None = None) -> ReleaseSigner:
    """Read and check ``signing_key`` and ``signing_cert``; raises ConfigError naming the fix."""
    key_pem, mode = _read(cfg.signing_key, "signing_key")
    cert_pem, _ = _read(cfg.signing_cert, "signing_cert")
    return _signer(cfg, key_pem, mode, cert_pem, cfg.signing_key, cfg.signing_cert, now)


def load_signing_keys(cfg: KbsConfig, now: dt.datetime | None = None) -> SigningKeys:
    """The current release-signing key and every key ``previous_signing_keys`` names."""
    previous = []
    for path in cfg.previous_signing_keys:
        pem, mode = read_config_file(
            path, "previous_signing_keys", "remove it from previous_signing_keys in kbs.toml"
        )
        previous.append(_signer(cfg, pem, mode, pem, path, path, now))
    return SigningKeys(load_signer(cfg, now), tuple(previous))


def _signer(
    cfg: KbsConfig, key_pem: bytes, mode: int, cert_pem: bytes, key_path: Path,
    cert_path: Path, now: dt.datetime | None,
) -> ReleaseSigner:  # fmt: skip
    if mode & 0o077:
        raise ConfigError(
            f"signing_key {key_path} is readable by other users (mode {mode:04o}); run "
            f"`chmod 600 {key_path}`"
        )
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"signing_key {key_path} is not an unencrypted PEM private key") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except MALFORMED:
        raise ConfigError(f"signing_cert {cert_path} is not a PEM certificate") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    ca = _ca(cfg)
    try:
        checked = signing_certificate(der, [ca], ConfigError)
        if not checked.valid_at(now or dt.datetime.now(dt.UTC)):
            raise ConfigError(
                f"it is not valid now (valid {checked.not_before:%Y-%m-%d} to "
                f"{checked.not_after:%Y-%m-%d})"
            )
    except ConfigError as exc:
        raise ConfigError(
            f"signing_cert {cert_path}: {exc}; agents would refuse every release. Make a "
            f"new one with `{_CREATE} --replace`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != checked.key:
        raise ConfigError(f"signing_key {key_path} is not the key of signing_cert {cert_path}")
    return ReleaseSigner(key=key, certificate=der, not_after=cert.not_valid_after_utc)


def create_signing_files(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key_path: Path,
    cert_path: Path,
    now: dt.datetime,
    *,
    replace: bool = False,
) -> None:
    """A new release-signing key (0600) and its certificate from the broker's CA. Existing files
    are refused unless ``replace`` (then each is swapped in atomically, the key first)."""
    existing = [str(p) for p in (key_path, cert_path) if p.exists()]
    if existing and not replace:
        raise OperatorError(
            f"{', '.join(existing)} already exist; `{_CREATE} --replace` makes a new key"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, SIGNING_OU),
            x509.NameAttribute(NameOID.COMMON_NAME, "keylease-kbs release signing"),
        ]
    )
    cert = issue_leaf(
        ca.subject, ca_key, subject, key.public_key(), now - dt.timedelta(hours=1),
        now + SIGNING_VALIDITY, (SIGNATURE_KEY_USAGE, True),
    )  # fmt: skip
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    for path, data, mode in ((key_path, key_pem(key), 0o600), (cert_path, cert_pem, 0o644)):
        tmp = path.with_name(f".{path.name}.new")
        try:
            tmp.unlink(missing_ok=True)
            write_new_file(tmp, data, mode)
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails if the file appeared meanwhile: never overwrite
                tmp.unlink()
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"cannot write {path}: {exc.strerror}") from None

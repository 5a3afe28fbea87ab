"""EK certificates: the trust bundle, chain verification and the EK/certificate match.

The chain is built by hand, not with a web-PKI verifier: EK certificates have an empty subject,
a critical TPM-manufacturer SAN and the TCG EKU, which web-PKI profiles reject. Each link is
checked explicitly: issuer name and signature (``verify_directly_issued_by``), validity at ``now``,
CA basic constraints and keyCertSign on every issuer, and the EK EKU (2.23.133.8.1) on the leaf.

``cryptography`` parses a certificate lazily and raises classes that are not ``ValueError`` for
some malformed ones (``DuplicateExtension``, ``UnsupportedGeneralNameType``); every part the
checks read is therefore parsed once, up front, and anything malformed is refused as
``EkCertificateMalformed`` before a trust decision is made. Names taken from an untrusted
certificate reach messages only through ``keylease.text.printable``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID

from kbs.errors import ConfigError, EkCertificateMalformed, EkPublicMismatch, UntrustedEk
from keylease.certificates import MALFORMED
from keylease.text import printable

__all__ = [
    "EK_CERTIFICATE_EKU",
    "EkTrustBundle",
    "check_ek_matches",
    "ek_hash",
    "load_ek_roots",
    "verify_ek_certificate",
]

EK_CERTIFICATE_EKU = x509.ObjectIdentifier("2.23.133.8.1")
MAX_CHAIN = 6

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class EkTrustBundle:
    """TPM-manufacturer roots (self-signed) and intermediates, from the ``ek_roots`` PEM bundle."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return self.roots + self.intermediates

    def issuers_of(self, cert: x509.Certificate) -> list[tuple[x509.Certificate, bool]]:
        """Candidate issuers by name: (certificate, is_root)."""
        found = [(c, True) for c in self.roots if c.subject == cert.issuer]
        found += [(c, False) for c in self.intermediates if c.subject == cert.issuer]
        return found


def load_ek_roots(path: Path, key: str = "ek_roots") -> EkTrustBundle:
    """The one loader of the ``ek_roots`` bundle (``serve``, ``check-config``, ``init
    --ek-roots``): every certificate in it must be a CA, and at least one a self-signed root.
    Raises ConfigError naming ``key``, the file and the fix."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"cannot read {key} {path}: it does not exist; put the TPM manufacturers' root and "
            "intermediate certificates there (PEM) or set `ek_roots` in kbs.toml"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read {key} {path}: {exc.strerror}; it must hold the PEM certificates of "
            "the TPM manufacturers whose EKs you trust"
        ) from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except MALFORMED:
        raise ConfigError(
            f"{key} {path} holds no PEM certificate (no readable PEM block: expected -----BEGIN "
            "CERTIFICATE----- blocks; convert DER with `openssl x509 -inform der`)"
        ) from None
    cas = [c for c in certs if _is_ca(c)]
    if not cas:
        raise ConfigError(
            f"{key} {path} holds {len(certs)} certificate(s) but no CA certificate "
            "(basicConstraints CA:TRUE); it must hold TPM-manufacturer roots and intermediates"
        )
    if len(cas) != len(certs):
        raise ConfigError(
            f"{key} {path} holds {len(certs) - len(cas)} certificate(s) that are not a CA "
            "(basicConstraints CA:TRUE); put only manufacturer roots and intermediates in it"
        )
    roots = tuple(c for c in cas if c.subject == c.issuer)
    if not roots:
        raise ConfigError(
            f"{key} {path} holds no self-signed root certificate; add the root the "
            "intermediates chain to"
        )
    return EkTrustBundle(roots=roots, intermediates=tuple(c for c in cas if c.subject != c.issuer))


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
    except MALFORMED:  # a malformed extension
        return False


def _can_sign_certs(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.key_cert_sign


def _within_validity(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _describe(cert: x509.Certificate) -> str:
    return printable(cert.subject.rfc4514_string(), 200) or f"serial {cert.serial_number:x}"


def _parse(der: bytes) -> x509.Certificate:
    """The certificate with every part the checks read parsed; EkCertificateMalformed if any
    part does not parse."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        raise EkCertificateMalformed("ek_certificate is not a DER X.509 certificate") from None
    for part, read in (
        ("its version", lambda: cert.version),
        ("its extensions", lambda: cert.extensions),
        ("its issuer name", lambda: cert.issuer.rfc4514_string()),
        ("its subject name", lambda: cert.subject.rfc4514_string()),
        ("its validity", lambda: (cert.not_valid_before_utc, cert.not_valid_after_utc)),
    ):
        try:
            read()
        except x509.DuplicateExtension as exc:
            raise EkCertificateMalformed(
                f"the EK certificate is malformed: extension {exc.oid.dotted_string} appears twice"
            ) from None
        except x509.UnsupportedGeneralNameType:
            raise EkCertificateMalformed(
                "the EK certificate is malformed: it has a name form this broker does not "
                "accept (x400Address or ediPartyName)"
            ) from None
        except MALFORMED:
            raise EkCertificateMalformed(
                f"the EK certificate is malformed: {part} cannot be parsed"
            ) from None
    return cert


def verify_ek_certificate(der: bytes, bundle: EkTrustBundle, now: datetime) -> x509.Certificate:
    """Parse the EK certificate and verify it chains to the bundle; raise UntrustedEk otherwise
    (EkCertificateMalformed when it does not parse)."""
    cert = _parse(der)
    extensions = cert.extensions
    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise UntrustedEk(
            "the EK certificate has no extendedKeyUsage; an EK certificate carries 2.23.133.8.1"
        ) from None
    if EK_CERTIFICATE_EKU not in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku:
        raise UntrustedEk("the EK certificate's extendedKeyUsage is not tcg-kp-EKCertificate")
    if not _within_validity(cert, now):
        raise UntrustedEk(
            f"the EK certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    if _chains(cert, bundle, now, depth=0):
        return cert
    issuer = printable(cert.issuer.rfc4514_string(), 200) or "-"
    raise UntrustedEk(
        f"the EK certificate (issuer {issuer}) does not chain to "
        "a root in ek_roots; if this TPM's manufacturer is trusted, add its root and "
        "intermediate certificates to the ek_roots bundle"
    )


def _chains(cert: x509.Certificate, bundle: EkTrustBundle, now: datetime, depth: int) -> bool:
    if depth >= MAX_CHAIN:
        return False
    for issuer, is_root in bundle.issuers_of(cert):
        if not (_is_ca(issuer) and _can_sign_certs(issuer) and _within_validity(issuer, now)):
            continue
        try:
            cert.verify_directly_issued_by(issuer)
        except (TypeError, InvalidSignature, *MALFORMED):
            continue
        if is_root or _chains(issuer, bundle, now, depth + 1):
            return True
    return False


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def check_ek_matches(cert: x509.Certificate, ek_key: PublicKey) -> None:
    """The EK public area the node sent must be the key its certificate certifies."""
    try:
        certified = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise UntrustedEk("the EK certificate's public key cannot be read") from None
    if not isinstance(certified, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise UntrustedEk("the EK certificate certifies neither an RSA nor an ECC key")
    if _spki(certified) != _spki(ek_key):
        raise EkPublicMismatch(
            f"the EK public area does not match the EK certificate ({_describe(cert)}): the "
            "certificate belongs to another TPM"
        )


def ek_hash(ek_key: PublicKey) -> str:
    """SHA-256 (hex) of the EK's DER SubjectPublicKeyInfo: the node's identity in the broker.

    Operators can compute it from an EK certificate with
    ``openssl x509 -in ek.pem -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum``.
    """
    return hashlib.sha256(_spki(ek_key)).hexdigest()

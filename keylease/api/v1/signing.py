"""Releases signed by the broker: what is signed, and the certificate that may sign it.

The broker signs each ``Release`` with its release-signing key (ECDSA P-256, SHA-256) and sends
the key's certificate along. The certificate is issued by the broker's CA (the ``agent-ca.pem``
agents already trust for TLS) and marked for this one use: ``OU=keylease-signing`` in its
subject, keyUsage digitalSignature (and not keyCertSign), basicConstraints CA:FALSE, and no
extended key usage that would let it serve TLS. The agent checks certificate and signature
before it installs or caches anything, and again when it restores from its cache.

The signature covers every field of the release in one canonical encoding (``release_payload``):
the label ``keylease.v1 release`` 0x00, then each field as a 4-byte big-endian length and its
bytes, in a fixed order; PCR indices as 4-byte big-endian integers; the policy group (since
issue 11) last, when there is one. The not-after of the lease is inside the AES-GCM bundle, which
the signature covers as ciphertext. Approvals carry signatures of their own
(``keylease.api.v1.approvals``).

Validity: the certificate's validity period is checked at the release's ``issued_at`` (the
broker's clock, inside the signed bundle), never at the node's clock, so a wrong node clock
cannot strand keys (the lease itself is measured in the node's TPM clock, issue 11).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keylease.api.v1 import SealedImport
from keylease.certificates import MALFORMED
from keylease.text import printable

__all__ = [
    "SIGNATURE_ALGORITHM",
    "SIGNING_OU",
    "SigningCertificate",
    "release_payload",
    "signing_certificate",
    "verify_release_signature",
]

SIGNING_OU = "keylease-signing"
SIGNATURE_ALGORITHM = ec.ECDSA(hashes.SHA256())
_LABEL = b"keylease.v1 release\x00"
_TLS_USAGES = (
    ExtendedKeyUsageOID.SERVER_AUTH,
    ExtendedKeyUsageOID.CLIENT_AUTH,
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
)


@dataclass(frozen=True)
class SigningCertificate:
    """A checked release-signing certificate: its key and validity period."""

    key: ec.EllipticCurvePublicKey
    not_before: datetime
    not_after: datetime

    def valid_at(self, when: datetime) -> bool:
        return self.not_before <= when <= self.not_after


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def release_payload(
    node_name: str,
    sealed: SealedImport,
    bundle_nonce: bytes,
    bundle_ciphertext: bytes,
    signing_certificate: bytes,
    policy_group: str = "",
) -> bytes:
    """The bytes the broker signs and the agent verifies for one release."""
    indices = b"".join(i.to_bytes(4, "big") for i in sealed.pcr_indices)
    fields = (
        node_name.encode(),
        sealed.duplicate,
        sealed.in_sym_seed,
        sealed.sealed_public,
        sealed.pcr_bank.encode(),
        indices,
        bundle_nonce,
        bundle_ciphertext,
        signing_certificate,
        *((policy_group.encode(),) if policy_group else ()),
    )
    return _LABEL + b"".join(_field(f) for f in fields)


def _subject_ou(cert: x509.Certificate) -> list[str]:
    return [
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]


def signing_certificate(
    certificate: bytes, issuers: Sequence[x509.Certificate], error: type[Exception]
) -> SigningCertificate:
    """A release-signing certificate (DER) issued by one of ``issuers`` and marked for release
    signing, with a P-256 key. Raises ``error`` (the caller's error class) naming what is wrong.
    Its validity period is the caller's to check (at the release's issue time, for an agent)."""
    try:
        cert = x509.load_der_x509_certificate(certificate)
        extensions = cert.extensions
        ou = _subject_ou(cert)
        key = cert.public_key()
    except MALFORMED:
        raise error("the release-signing certificate is malformed") from None
    if SIGNING_OU not in ou:
        raise error(
            f"the release-signing certificate is not marked OU={SIGNING_OU} (it is not a "
            "keylease release-signing certificate)"
        )
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise error("the release-signing certificate lacks basicConstraints or keyUsage") from None
    if constraints.ca or not usage.digital_signature or usage.key_cert_sign:
        raise error("the release-signing certificate is a CA or not a signing certificate")
    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and any(u in eku for u in _TLS_USAGES):
        raise error("the release-signing certificate is also a TLS certificate; refusing it")
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise error("the release-signing certificate's key is not ECDSA P-256")
    if not any(_issued_by(cert, ca) for ca in issuers):
        raise error(
            "the release-signing certificate is not issued by the broker's CA (kbs_ca); "
            f"its issuer is {printable(_issuer_text(cert), 200)}"
        )
    return SigningCertificate(key, cert.not_valid_before_utc, cert.not_valid_after_utc)


def _issuer_text(cert: x509.Certificate) -> str:
    try:
        return cert.issuer.rfc4514_string() or "-"
    except MALFORMED:
        return "(unreadable)"


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, x509.ExtensionNotFound, *MALFORMED):
        return False
    return True


def verify_release_signature(
    key: ec.EllipticCurvePublicKey, payload: bytes, signature: bytes, error: type[Exception]
) -> None:
    """Raise ``error`` unless ``signature`` is the signing key's ECDSA-SHA256 over ``payload``."""
    try:
        key.verify(signature, payload, SIGNATURE_ALGORITHM)
    except InvalidSignature:
        raise error(
            "the release's signature does not verify with the broker's release-signing key: it "
            "was not made by the broker, or was altered"
        ) from None

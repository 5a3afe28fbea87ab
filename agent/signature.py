"""Releases come from the broker: its signature is checked before anything is installed or cached.

The trust anchor is ``kbs_ca`` (the broker's CA, ``agent-ca.pem``), the same file TLS trusts.
``verify_release`` checks, before the TPM is asked to open anything: the release-signing
certificate carried in the release is issued by that CA and marked for release signing
(``keylease.api.v1.signing``), and its ECDSA signature covers every field of the release. The
certificate's validity is checked later, against the release's issue time inside the signed
bundle (``agent.release``): the broker's clock, not the node's, so a wrong node clock cannot
strand keys. A planted or altered release (``release.bin`` included) is refused with
``ReleaseInvalid``, which never removes keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from agent.blobs import ReleaseBlob
from agent.errors import ConfigError, ReleaseInvalid
from keylease.api.v1.limits import MAX_RELEASE_SIGNATURE, MAX_SIGNING_CERTIFICATE
from keylease.api.v1.signing import (
    SigningCertificate,
    release_payload,
    signing_certificate,
    verify_release_signature,
)
from keylease.certificates import MALFORMED

__all__ = ["ReleaseTrust", "verify_release"]


@dataclass(frozen=True)
class ReleaseTrust:
    """The broker CA certificates from ``kbs_ca``."""

    issuers: tuple[x509.Certificate, ...]

    @classmethod
    def load(cls, kbs_ca: Path) -> ReleaseTrust:
        try:
            data = kbs_ca.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read kbs_ca {kbs_ca}: {exc.strerror}") from None
        try:
            certs = x509.load_pem_x509_certificates(data)
        except MALFORMED:
            raise ConfigError(
                f"kbs_ca {kbs_ca} holds no PEM certificate; copy agent-ca.pem from the broker"
            ) from None
        return cls(tuple(certs))


def verify_release(trust: ReleaseTrust, blob: ReleaseBlob) -> SigningCertificate:
    """The checked signing certificate of a release whose signature verifies; ReleaseInvalid
    otherwise (no signature, a certificate not from the broker's CA or not for signing, a
    signature over anything else)."""
    if not blob.signing_certificate or not blob.signature:
        raise ReleaseInvalid(
            "the release is not signed by the broker (a release from an older broker, or not "
            "from the broker at all); refusing it"
        )
    if len(blob.signing_certificate) > MAX_SIGNING_CERTIFICATE:
        raise ReleaseInvalid("the release's signing certificate is too large; refusing it")
    if len(blob.signature) > MAX_RELEASE_SIGNATURE:
        raise ReleaseInvalid("the release's signature is too large; refusing it")
    checked = signing_certificate(blob.signing_certificate, trust.issuers, ReleaseInvalid)
    payload = release_payload(
        blob.node_name,
        blob.sealed,
        blob.bundle_nonce,
        blob.bundle_ciphertext,
        blob.signing_certificate,
        blob.policy_group,
    )
    verify_release_signature(checked.key, payload, blob.signature, ReleaseInvalid)
    return checked

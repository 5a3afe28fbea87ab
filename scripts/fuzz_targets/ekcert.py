"""EK certificates, against a trust bundle of a root and an intermediate."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kbs.tpm.ekcert import (
    EK_CERTIFICATE_EKU,
    EkTrustBundle,
    check_ek_matches,
    ek_hash,
    load_ek_roots,
    verify_ek_certificate,
)
from scripts.fuzz_targets.common import NOW, ec_key, work

# --- EK certificates ---------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fuzz TPM Maker"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # fmt: skip


def _ca_cert(
    key: ec.EllipticCurvePrivateKey, cn: str, issuer: tuple[ec.EllipticCurvePrivateKey, str] | None
) -> x509.Certificate:
    signer, issuer_cn = issuer or (key, cn)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(cn.encode()).digest()[:4], "big") | 1)
        .not_valid_before(NOW - timedelta(days=3650))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(signer, hashes.SHA256(), ecdsa_deterministic=True)
    )


@cache
def _ek_pki() -> tuple[EkTrustBundle, ec.EllipticCurvePrivateKey]:
    """The trust bundle (a root and an intermediate, as ek_roots holds them) and the issuing
    intermediate's key."""
    root_key, inter_key = ec_key(10), ec_key(11)
    root = _ca_cert(root_key, "Fuzz EK Root", None)
    inter = _ca_cert(inter_key, "Fuzz EK Intermediate", (root_key, "Fuzz EK Root"))
    path = work() / "ek-roots.pem"
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (root, inter)))
    return load_ek_roots(path), inter_key


def fuzz_ek_certificate(data: bytes) -> None:
    bundle, _ = _ek_pki()
    cert = verify_ek_certificate(data, bundle, NOW)
    ek = ec_key(2).public_key()
    check_ek_matches(cert, ek)
    ek_hash(ek)


def ek_seeds() -> Iterator[bytes]:
    _, inter_key = _ek_pki()
    for i, key in enumerate((ec_key(2), ec_key(5, ec.SECP384R1()))):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(_name("Fuzz EK Intermediate"))
            .public_key(key.public_key())
            .serial_number(1000 + i)
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=3650))
            .add_extension(x509.ExtendedKeyUsage([EK_CERTIFICATE_EKU]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.DirectoryName(_name(f"tpm {i}"))]), critical=True
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        cert = builder.sign(inter_key, hashes.SHA256(), ecdsa_deterministic=True)
        yield cert.public_bytes(serialization.Encoding.DER)

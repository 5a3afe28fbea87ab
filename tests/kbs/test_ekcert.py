"""EK certificate chain checks on certificates built here (the swtpm-issued path is in test_e2e)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from harness.der import duplicate_extension, malformed_issuer, x400_san
from kbs.errors import (
    ConfigError,
    EkCertificateMalformed,
    EkPublicMismatch,
    InvalidRequest,
    UntrustedEk,
)
from kbs.tpm.ekcert import (
    EK_CERTIFICATE_EKU,
    check_ek_matches,
    ek_hash,
    load_ek_roots,
    verify_ek_certificate,
)

NOW = datetime(2026, 6, 1, tzinfo=UTC)
Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def cert(
    subject: str,
    key: Key,
    issuer: tuple[str, Key] | None = None,
    *,
    ca: bool = False,
    eku: bool = True,
    days: int = 3650,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject) if ca else x509.Name([]))
        .issuer_name(name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DirectoryName(name("tpm manufacturer"))]),
            critical=True,
        )
        if eku:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([EK_CERTIFICATE_EKU]), critical=False
            )
    return builder.sign(issuer_key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class Pki:
    root: x509.Certificate
    inter: x509.Certificate
    inter_key: ec.EllipticCurvePrivateKey
    ek_key: rsa.RSAPrivateKey
    ek: x509.Certificate


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_key = ec.generate_private_key(ec.SECP384R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    ek_key = rsa.generate_private_key(65537, 2048)
    root = cert("Root", root_key, ca=True)
    inter = cert("Intermediate", inter_key, ("Root", root_key), ca=True)
    return Pki(root, inter, inter_key, ek_key, cert("", ek_key, ("Intermediate", inter_key)))


def bundle(tmp_path: Path, *certs: x509.Certificate) -> Path:
    path = tmp_path / "roots.pem"
    path.write_bytes(pem(*certs))
    return path


def der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def test_chain_through_intermediate_verifies(pki: Pki, tmp_path: Path) -> None:
    roots = load_ek_roots(bundle(tmp_path, pki.root, pki.inter))
    verified = verify_ek_certificate(der(pki.ek), roots, NOW)
    check_ek_matches(verified, pki.ek_key.public_key())
    assert len(ek_hash(pki.ek_key.public_key())) == 64


def test_missing_intermediate_is_untrusted(pki: Pki, tmp_path: Path) -> None:
    roots = load_ek_roots(bundle(tmp_path, pki.root))
    with pytest.raises(UntrustedEk, match="does not chain"):
        verify_ek_certificate(der(pki.ek), roots, NOW)


def test_same_names_other_keys_is_untrusted(pki: Pki, tmp_path: Path) -> None:
    """An attacker's CA with the manufacturer's names: the signature check catches it."""
    fake_root_key = ec.generate_private_key(ec.SECP384R1())
    fake_inter_key = ec.generate_private_key(ec.SECP256R1())
    ek_key = rsa.generate_private_key(65537, 2048)
    forged = cert("", ek_key, ("Intermediate", fake_inter_key))
    fake_inter = cert("Intermediate", fake_inter_key, ("Root", fake_root_key), ca=True)
    roots = load_ek_roots(bundle(tmp_path, pki.root, pki.inter))
    with pytest.raises(UntrustedEk):
        verify_ek_certificate(der(forged), roots, NOW)
    # ... and a bundle that trusts the real root does not trust the fake intermediate either.
    mixed = load_ek_roots(bundle(tmp_path, pki.root, fake_inter))
    with pytest.raises(UntrustedEk):
        verify_ek_certificate(der(forged), mixed, NOW)


def test_ek_without_eku_is_untrusted(pki: Pki, tmp_path: Path) -> None:
    no_eku = cert(
        "", rsa.generate_private_key(65537, 2048), ("Intermediate", pki.inter_key), eku=False
    )
    roots = load_ek_roots(bundle(tmp_path, pki.root, pki.inter))
    with pytest.raises(UntrustedEk, match="extendedKeyUsage"):
        verify_ek_certificate(der(no_eku), roots, NOW)


def test_expired_ek_is_untrusted(pki: Pki, tmp_path: Path) -> None:
    roots = load_ek_roots(bundle(tmp_path, pki.root, pki.inter))
    with pytest.raises(UntrustedEk, match="not valid now"):
        verify_ek_certificate(der(pki.ek), roots, NOW + timedelta(days=4000))


def test_ek_public_mismatch(pki: Pki, tmp_path: Path) -> None:
    roots = load_ek_roots(bundle(tmp_path, pki.root, pki.inter))
    verified = verify_ek_certificate(der(pki.ek), roots, NOW)
    with pytest.raises(EkPublicMismatch, match="does not match"):
        check_ek_matches(verified, rsa.generate_private_key(65537, 2048).public_key())


def test_garbage_certificate_is_invalid_request(pki: Pki, tmp_path: Path) -> None:
    roots = load_ek_roots(bundle(tmp_path, pki.root))
    with pytest.raises(InvalidRequest, match=r"DER X\.509"):
        verify_ek_certificate(b"\x30\x03garbage", roots, NOW)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "no readable PEM"), (b"not pem", "no readable PEM"), (None, "cannot read")],
)
def test_bad_root_bundle_is_a_config_error(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "roots.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_ek_roots(path)


def test_leaf_in_root_bundle_is_a_config_error(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a CA"):
        load_ek_roots(bundle(tmp_path, pki.root, pki.ek))


# --- crafted certificates (issue 10, finding 6: INTERNAL with a traceback before any trust check)


@pytest.mark.parametrize(
    ("craft", "message"),
    [
        (duplicate_extension, r"extension 2\.5\.29\.\d+ appears twice"),
        (x400_san, "x400Address or ediPartyName"),
        (malformed_issuer, "its issuer name cannot be parsed"),
    ],
    ids=["duplicate-extension", "x400-san", "malformed-issuer"],
)
def test_crafted_ek_certificates_are_refused_with_a_specific_error(
    pki: Pki, tmp_path: Path, craft: Callable[[x509.Certificate, Key], bytes], message: str
) -> None:
    """Signed by the trusted intermediate, so only the parse can refuse them."""
    crafted = craft(pki.ek, pki.inter_key)
    roots = load_ek_roots(bundle(tmp_path, pki.root, pki.inter))
    with pytest.raises(EkCertificateMalformed, match=message):
        verify_ek_certificate(crafted, roots, NOW)


def test_an_untrusted_issuer_name_is_escaped_in_the_refusal(pki: Pki, tmp_path: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    hostile = cert("", pki.ek_key, ("evil\x1b]0;owned\x07\nINFO forged line", other))
    roots = load_ek_roots(bundle(tmp_path, pki.root, pki.inter))
    with pytest.raises(UntrustedEk) as refused:
        verify_ek_certificate(der(hostile), roots, NOW)
    text = str(refused.value)
    assert not {"\x1b", "\n", "\x07"} & set(text)
    assert r"CN=evil\x1b]0\;owned\x07\x0aINFO forged line" in text  # RFC 4514 escapes ";"

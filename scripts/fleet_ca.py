"""A test TPM-manufacturer CA for the fleet benchmark: EK certificates for many distinct EKs.

swtpm_setup certifies only the one EK each TPM state was manufactured with; the benchmark gives
every simulated node its own EK (see ``scripts.fleet_tpm``), so it certifies them here with the
same shape as swtpm's certificates (empty subject, critical SAN directoryName with the TPM
manufacturer/model/version attributes, EKU 2.23.133.8.1) under an ECDSA P-256 root that the
broker's ``ek_roots`` trusts.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kbs.tls import CA_KEY_USAGE

__all__ = ["EkCa"]

EK_EKU = x509.ObjectIdentifier("2.23.133.8.1")
TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")


@dataclass(frozen=True)
class EkCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls) -> EkCa:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keylease fleet bench EK CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                CA_KEY_USAGE,
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def root_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue_ek_cert(self, ek_key: ec.EllipticCurvePublicKey, serial: int) -> bytes:
        """DER EK certificate for ``ek_key``, shaped like swtpm_localca's."""
        now = dt.datetime.now(dt.UTC)
        san = x509.SubjectAlternativeName(
            [
                x509.DirectoryName(
                    x509.Name(
                        [
                            x509.RelativeDistinguishedName(
                                [
                                    x509.NameAttribute(TPM_MANUFACTURER, "id:00001014"),
                                    x509.NameAttribute(TPM_MODEL, "swtpm"),
                                    x509.NameAttribute(TPM_VERSION, "id:20191023"),
                                ]
                            )
                        ]
                    )
                )
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(ek_key)
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(san, critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([EK_EKU]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)

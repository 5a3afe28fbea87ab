"""The broker's approvals as an agent reads them (issue 11): ``approvals.bin`` in its state
directory (``agent.keystore.ApprovalStore.load``: a damaged file reads as none), then the checks
before one is kept (``keylease.api.v1.approvals.verify_approval``, as ``agent.approvals.accepted``
calls it: shape, the broker's certificate, both signatures; ``ReleaseInvalid`` when refused).
The same parser reads the approvals a release or the watch stream carries."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import replace
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from agent.approvals import ApprovalStore, accepted
from agent.errors import ReleaseInvalid
from agent.signature import ReleaseTrust
from agent.state import StateDir
from keylease.api.v1.approvals import (
    Approval,
    ApprovedComponent,
    approval_payload,
    encode_approvals,
    verify_approval,
)
from keylease.api.v1.signing import SIGNATURE_ALGORITHM, SIGNING_OU
from scripts.fuzz_targets.common import NODE, NOW, ec_key, work


def _certificate(subject: str, ca: bool, key_n: int, issuer: str) -> x509.Certificate:
    """A certificate made from fixed numbers (key, serial, times), issued by ``ec_key(30)``."""
    usage = x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    ou = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, SIGNING_OU)] if not ca else []
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([*ou, x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(ec_key(key_n).public_key())
        .serial_number(key_n)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(ec_key(30), hashes.SHA256())
    )


@cache
def _trust() -> ReleaseTrust:
    return ReleaseTrust((_certificate("fuzz CA", True, 30, "fuzz CA"),))


@cache
def _store() -> tuple[ApprovalStore, StateDir]:
    state = StateDir.open(work() / "approvals-state")
    return ApprovalStore(state), state


def fuzz_approvals(data: bytes) -> None:
    store, state = _store()
    (state.path / "approvals.bin").write_bytes(data)
    for approval in store.load():
        verify_approval(approval, _trust().issuers, ReleaseInvalid)


def approval_seeds() -> Iterator[bytes]:
    cert = _certificate("fuzz signing", False, 31, "fuzz CA")
    unsigned = Approval(
        node_name=NODE, policy_group="prod-boot", bank="sha256",
        pcrs=((0, bytes(32)), (4, b"\x04" * 32), (7, b"\x07" * 32)), clock_limit=5_000_000,
        components=(ApprovedComponent("boot-app.3", "\\EFI\\debian\\vmlinuz", "6.1.0-28"),),
        origin="canary worker-2", issued_at=int(NOW.timestamp()),
        signing_certificate=cert.public_bytes(serialization.Encoding.DER),
    )  # fmt: skip
    key = ec_key(31)
    authorized = replace(
        unsigned, authorization=key.sign(unsigned.authorization_message(), SIGNATURE_ALGORITHM)
    )
    signed = replace(
        authorized, signature=key.sign(approval_payload(authorized), SIGNATURE_ALGORITHM)
    )
    assert accepted([signed], _trust(), NODE) == [signed], "the seed approval must be accepted"
    yield encode_approvals([signed])
    yield encode_approvals([signed, replace(signed, policy_group="other", signature=b"x" * 70)])

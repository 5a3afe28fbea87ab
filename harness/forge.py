"""Releases and approvals made outside the broker, for the tests of what the agent accepts: what
a stranger who knows a node's public EK and its PCR values can build (a release that opens in
that TPM; an approval of any PCR values), signed by the broker's real signing key or by a key of
the stranger's own.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from agent.blobs import ReleaseBlob
from agent.config import AgentConfig
from agent.tpm import Tpm
from harness.broker import Broker
from kbs.config import load_config
from kbs.signing import ReleaseSigner, create_signing_files, load_signer
from kbs.tpm.objects import parse_public
from kbs.tpm.sealing import seal_to_ek
from keylease.api.v1 import bundle_aad
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1.approvals import Approval, ApprovedComponent, approval_payload
from keylease.api.v1.signing import release_payload
from keylease.api.v1.tpmpolicy import policy_pcr_digest
from keylease.secret import Secret

__all__ = ["broker_signer", "forged_approval", "forged_release", "stranger_signer"]

POLICY_PCRS = tuple(range(8))


def broker_signer(broker: Broker) -> ReleaseSigner:
    """The broker's own release-signing key (read from its directory)."""
    return load_signer(load_config(broker.config))


def stranger_signer(directory: Path) -> ReleaseSigner:
    """A signing key and certificate exactly like the broker's, from a CA of the stranger's own."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keylease-kbs CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key_path, cert_path = directory / "stranger-signing-key.pem", directory / "stranger-signing.pem"
    create_signing_files(ca, ca_key, key_path, cert_path, now)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return ReleaseSigner(
        key=key,
        certificate=cert.public_bytes(serialization.Encoding.DER),
        not_after=cert.not_valid_after_utc,
    )


def forged_release(
    cfg: AgentConfig,
    signer: ReleaseSigner,
    keys: Sequence[tuple[str, int, bytes]],
    *,
    issued_at: int | None = None,
    not_after: int | None = None,
) -> ReleaseBlob:
    """A release for ``cfg``'s node that opens in its TPM in its current PCR state (0-7) under
    PolicyPCR (as a broker before issue 11 made them), holding ``keys`` (name, version, PKCS#8
    PEM), with the given lease times (default: an hour from now), signed by ``signer``."""
    with Tpm.open(cfg.tcti) as tpm:
        ek = parse_public(tpm.read_ek().public, "ek")
        pcrs = tpm.read_pcrs("sha256", POLICY_PCRS)
    data_key = Secret(os.urandom(32))
    sealed = seal_to_ek(ek, data_key, policy_pcr_digest("sha256", pcrs), "sha256", POLICY_PCRS)
    now = int(dt.datetime.now(dt.UTC).timestamp())
    bundle = pb.KeyBundle(
        node_name=cfg.node_name,
        issued_at_unix=now if issued_at is None else issued_at,
        not_after_unix=now + 3600 if not_after is None else not_after,
        keys=[pb.BundledKey(name=n, version=v, private_key_pem=pem) for n, v, pem in keys],
    )
    nonce = os.urandom(12)
    ciphertext = AESGCM(data_key.reveal()).encrypt(
        nonce, bundle.SerializeToString(), bundle_aad(cfg.node_name, sealed.sealed_public)
    )
    payload = release_payload(cfg.node_name, sealed, nonce, ciphertext, signer.certificate)
    return ReleaseBlob(
        node_name=cfg.node_name,
        sealed=sealed,
        bundle_nonce=nonce,
        bundle_ciphertext=ciphertext,
        signing_certificate=signer.certificate,
        signature=signer.sign(payload),
    )


def forged_approval(
    signer: ReleaseSigner,
    node_name: str,
    group: str,
    pcrs: dict[int, bytes],
    clock_limit: int,
    *,
    bank: str = "sha256",
    origin: str = "forged",
    components: Sequence[tuple[str, str, str]] = (),
) -> Approval:
    """An approval of ``pcrs`` for ``node_name`` and ``group``, signed (both signatures) by
    ``signer``: the broker's key (``broker_signer``) makes it genuine, any other a forgery."""
    unsigned = Approval(
        node_name=node_name,
        policy_group=group,
        bank=bank,
        pcrs=tuple(sorted(pcrs.items())),
        clock_limit=clock_limit,
        components=tuple(ApprovedComponent(*c) for c in components),
        origin=origin,
        issued_at=int(dt.datetime.now(dt.UTC).timestamp()),
        signing_certificate=signer.certificate,
    )
    authorized = replace(unsigned, authorization=signer.sign(unsigned.authorization_message()))
    return replace(authorized, signature=signer.sign(approval_payload(authorized)))

"""Release: the granted keys, bound to one TPM in one measured state (DESIGN.md step 3).

A fresh 32-byte data key is sealed into a keyedhash object duplicated to the node's EK with a
PolicyPCR authPolicy over the attested values (``kbs.tpm.sealing``). The data key
AES-256-GCM-encrypts a serialized ``KeyBundle``. Only that TPM, with those PCR values, can
recover the data key. The broker signs the whole release (``kbs.signing``), so that an agent
installs and caches only what this broker made.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kbs.signing import ReleaseSigner
from kbs.tpm.objects import TpmPublic
from kbs.tpm.sealing import SealedImport, seal_to_ek
from keylease.api.v1 import bundle_aad, keylease_pb2
from keylease.api.v1.signing import release_payload
from keylease.secret import Secret

__all__ = ["GrantedKey", "SealedRelease", "build_release"]


@dataclass(frozen=True)
class GrantedKey:
    name: str
    version: int
    private_pem: Secret


@dataclass(frozen=True)
class SealedRelease:
    node_name: str
    sealed: SealedImport
    bundle_nonce: bytes
    bundle_ciphertext: bytes
    not_after: datetime
    keys: tuple[tuple[str, int], ...]  # (name, version) for audit and logs; no key material
    signing_certificate: bytes  # DER
    signature: bytes  # over release_payload()


def build_release(
    *,
    node_name: str,
    ek: TpmPublic,
    pcr_bank: str,
    pcrs: Mapping[int, bytes],
    keys: Sequence[GrantedKey],
    issued_at: datetime,
    not_after: datetime,
    signer: ReleaseSigner,
) -> SealedRelease:
    data_key = Secret(AESGCM.generate_key(bit_length=256))
    sealed = seal_to_ek(ek, data_key, pcr_bank, pcrs)
    bundle = keylease_pb2.KeyBundle(
        node_name=node_name,
        issued_at_unix=int(issued_at.timestamp()),
        not_after_unix=int(not_after.timestamp()),
        keys=[
            keylease_pb2.BundledKey(
                name=k.name, version=k.version, private_key_pem=k.private_pem.reveal()
            )
            for k in keys
        ],
    )
    nonce = os.urandom(12)
    ciphertext = AESGCM(data_key.reveal()).encrypt(
        nonce, bundle.SerializeToString(), bundle_aad(node_name, sealed.sealed_public)
    )
    payload = release_payload(node_name, sealed, nonce, ciphertext, signer.certificate)
    return SealedRelease(
        node_name=node_name,
        sealed=sealed,
        bundle_nonce=nonce,
        bundle_ciphertext=ciphertext,
        not_after=not_after,
        keys=tuple((k.name, k.version) for k in keys),
        signing_certificate=signer.certificate,
        signature=signer.sign(payload),
    )

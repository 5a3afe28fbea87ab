"""Release: the granted keys, bound to one TPM and opened only in approved states (DESIGN.md
step 3).

A fresh 32-byte data key is sealed into a keyedhash object duplicated to the node's EK whose
authPolicy is PolicyAuthorize by the broker's release-signing key for this node and its policy
group (``kbs.tpm.sealing``, ``keylease.api.v1.tpmpolicy``): only that TPM, holding PCR values an
approval of the broker's approves, before the approval's TPM-clock limit, recovers the data key.
The data key AES-256-GCM-encrypts a serialized ``KeyBundle``, which also says where the lease
ends in the node's TPM time. The release carries its approvals (``kbs.approvals.release``), and the
broker signs it (``kbs.signing``), so that an agent installs and caches only what this broker made.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kbs.signing import ReleaseSigner
from kbs.tpm.objects import TpmPublic
from kbs.tpm.sealing import SealedImport, seal_to_ek
from keylease.api.v1 import bundle_aad, keylease_pb2
from keylease.api.v1.approvals import Approval
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
    policy_group: str
    approvals: tuple[Approval, ...]


def build_release(
    *,
    node_name: str,
    ek: TpmPublic,
    auth_policy: bytes,
    policy_group: str,
    pcr_bank: str,
    pcr_indices: Sequence[int],
    approvals: Sequence[Approval],
    keys: Sequence[GrantedKey],
    issued_at: datetime,
    not_after: datetime,
    lease_clock_limit: int,
    signer: ReleaseSigner,
) -> SealedRelease:
    data_key = Secret(AESGCM.generate_key(bit_length=256))
    sealed = seal_to_ek(ek, data_key, auth_policy, pcr_bank, pcr_indices)
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
        lease_clock_limit=lease_clock_limit,
    )
    nonce = os.urandom(12)
    ciphertext = AESGCM(data_key.reveal()).encrypt(
        nonce, bundle.SerializeToString(), bundle_aad(node_name, sealed.sealed_public)
    )
    payload = release_payload(
        node_name, sealed, nonce, ciphertext, signer.certificate, policy_group
    )
    return SealedRelease(
        node_name=node_name,
        sealed=sealed,
        bundle_nonce=nonce,
        bundle_ciphertext=ciphertext,
        not_after=not_after,
        keys=tuple((k.name, k.version) for k in keys),
        signing_certificate=signer.certificate,
        signature=signer.sign(payload),
        policy_group=policy_group,
        approvals=tuple(approvals),
    )

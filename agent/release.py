"""Opening a release: TPM import + PolicyPCR unseal of the data key, AES-GCM, key checks.

A release (``ReleaseBlob``) is also the at-rest cache: it is useless without this TPM in the
attested PCR state. The plaintext bundle exists only in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from agent.errors import ReleaseInvalid
from agent.keystore import InstallableKey
from agent.ocikey import validate_private_key_pem
from agent.tpm import SealedImport, Tpm
from keylease.api.v1 import bundle_aad
from keylease.api.v1 import keylease_pb2 as pb
from keylease.secret import Secret

__all__ = ["Bundle", "ReleaseBlob", "open_release"]


@dataclass(frozen=True)
class ReleaseBlob:
    node_name: str
    sealed: SealedImport
    bundle_nonce: bytes
    bundle_ciphertext: bytes

    @classmethod
    def from_pb(cls, msg: pb.Release) -> ReleaseBlob:
        return cls(
            node_name=msg.node_name,
            sealed=SealedImport(
                duplicate=msg.duplicate,
                in_sym_seed=msg.in_sym_seed,
                sealed_public=msg.sealed_public,
                pcr_bank=msg.pcr_bank,
                pcr_indices=tuple(msg.pcr_indices),
            ),
            bundle_nonce=msg.bundle_nonce,
            bundle_ciphertext=msg.bundle_ciphertext,
        )

    @classmethod
    def parse(cls, data: bytes) -> ReleaseBlob:
        msg = pb.Release()
        try:
            msg.ParseFromString(data)
        except DecodeError:
            raise ReleaseInvalid("the cached release is damaged; it will be replaced") from None
        return cls.from_pb(msg)

    def serialize(self) -> bytes:
        return pb.Release(
            node_name=self.node_name,
            duplicate=self.sealed.duplicate,
            in_sym_seed=self.sealed.in_sym_seed,
            sealed_public=self.sealed.sealed_public,
            pcr_bank=self.sealed.pcr_bank,
            pcr_indices=list(self.sealed.pcr_indices),
            bundle_nonce=self.bundle_nonce,
            bundle_ciphertext=self.bundle_ciphertext,
        ).SerializeToString()


@dataclass(frozen=True)
class Bundle:
    node_name: str
    issued_at: datetime
    not_after: datetime
    keys: tuple[InstallableKey, ...]

    def describe(self) -> str:
        return ",".join(f"{k.name}@v{k.version}" for k in self.keys) or "none"


def open_release(tpm: Tpm, blob: ReleaseBlob, node_name: str) -> Bundle:
    """Unseal and decrypt; every key is checked the way ocicrypt will parse it.

    Raises ReleaseInvalid (wrong TPM, changed PCRs, tampered or foreign bundle) or InvalidKey.
    """
    if blob.node_name != node_name:
        raise ReleaseInvalid(
            f"the release is for node {blob.node_name!r}, not {node_name!r}; refusing it"
        )
    if not blob.sealed.pcr_indices:
        raise ReleaseInvalid("the release is not bound to any PCR; refusing it")
    data_key = tpm.unseal_import(blob.sealed)
    if len(data_key) != 32:
        raise ReleaseInvalid("the sealed data key has the wrong size; refusing the release")
    try:
        plaintext = AESGCM(data_key.reveal()).decrypt(
            blob.bundle_nonce,
            blob.bundle_ciphertext,
            bundle_aad(blob.node_name, blob.sealed.sealed_public),
        )
    except (InvalidTag, ValueError):
        raise ReleaseInvalid(
            "the key bundle does not decrypt: it was altered in transit or at rest"
        ) from None
    msg = pb.KeyBundle()
    try:
        msg.ParseFromString(plaintext)
    except DecodeError:
        raise ReleaseInvalid("the key bundle is malformed") from None
    if msg.node_name != node_name:
        raise ReleaseInvalid(f"the key bundle names node {msg.node_name!r}, not {node_name!r}")
    keys = tuple(
        InstallableKey(name=k.name, version=k.version, pem=Secret(k.private_key_pem))
        for k in msg.keys
    )
    for key in keys:
        validate_private_key_pem(key.name, key.pem)
    return Bundle(
        node_name=msg.node_name,
        issued_at=datetime.fromtimestamp(msg.issued_at_unix, UTC),
        not_after=datetime.fromtimestamp(msg.not_after_unix, UTC),
        keys=keys,
    )

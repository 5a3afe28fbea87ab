"""Opening a release: TPM import + PolicyPCR unseal of the data key, AES-GCM, key checks.

The same steps open a release fresh from the broker and one restored from the sealed cache. The
plaintext bundle exists only in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from agent.blobs import ReleaseBlob
from agent.errors import ReleaseInvalid
from agent.keystore import InstallableKey, validate_private_key_pem
from agent.keystore.keyfile import validate_version
from agent.tpm import Tpm
from keylease.api.v1 import bundle_aad
from keylease.api.v1 import keylease_pb2 as pb
from keylease.secret import Secret

__all__ = ["Bundle", "open_release"]


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
        validate_version(key.name, key.version)
    return Bundle(
        node_name=msg.node_name,
        issued_at=datetime.fromtimestamp(msg.issued_at_unix, UTC),
        not_after=datetime.fromtimestamp(msg.not_after_unix, UTC),
        keys=keys,
    )

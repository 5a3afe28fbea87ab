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
from agent.tpm import Tpm
from keylease.api.v1 import bundle_aad
from keylease.api.v1 import keylease_pb2 as pb
from keylease.secret import Secret

__all__ = ["Bundle", "open_release", "parse_bundle"]


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
    return parse_bundle(plaintext, node_name)


def parse_bundle(plaintext: bytes, node_name: str) -> Bundle:
    """The decrypted key bundle for ``node_name``: raises ReleaseInvalid or InvalidKey."""
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
        issued_at=_time(msg.issued_at_unix, "issued_at"),
        not_after=_time(msg.not_after_unix, "not_after"),
        keys=keys,
    )


def _time(unix: int, field: str) -> datetime:
    """A bundle time; a value no date can hold (e.g. 2**62) is refused, never a crash."""
    try:
        return datetime.fromtimestamp(unix, UTC)
    except (OverflowError, OSError, ValueError):
        raise ReleaseInvalid(
            f"the key bundle's {field} ({unix}) is not a time; refusing it"
        ) from None

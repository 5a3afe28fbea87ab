"""Opening a release: the broker's signature, TPM import + unseal of the data key under the
broker's approval (PolicyAuthorize; PolicyPCR for a release from a broker before issue 11),
AES-GCM, lease times, key checks.

The same steps open a release fresh from the broker and one restored from the sealed cache; which
approval opens it is chosen by ``agent.approvals``. The plaintext bundle exists only in memory.
Lease times are refused at parse unless they make sense: issued_at and not_after within the years
2000-9999, not_after after issued_at and at most ``MAX_LEASE_SECONDS`` (the longest lease a broker
gives) later, and the signing certificate valid at issued_at. ``lease_clock_limit`` is where the
lease ends in the TPM's clock (0 from an older broker).
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
from agent.signature import ReleaseTrust, verify_release
from agent.tpm import Tpm
from keylease.api.v1 import bundle_aad
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1.approvals import Approval
from keylease.api.v1.limits import MAX_LEASE_SECONDS
from keylease.secret import Secret
from keylease.text import printable

__all__ = ["Bundle", "open_release", "parse_bundle"]

EARLIEST = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp())
LATEST = int(datetime(9999, 12, 31, tzinfo=UTC).timestamp())


@dataclass(frozen=True)
class Bundle:
    node_name: str
    issued_at: datetime
    not_after: datetime
    keys: tuple[InstallableKey, ...]
    lease_clock_limit: int = 0  # TPM clock (ms) at which the lease ends; 0: not given

    def describe(self) -> str:
        return ",".join(f"{k.name}@v{k.version}" for k in self.keys) or "none"


def open_release(
    tpm: Tpm,
    blob: ReleaseBlob,
    node_name: str,
    trust: ReleaseTrust,
    approval: Approval | None = None,
) -> Bundle:
    """Check the broker's signature, unseal (under ``approval`` for a release bound to
    approvals) and decrypt; every key is checked the way ocicrypt will parse it.

    Raises ReleaseInvalid (not signed by the broker, wrong TPM, not approved in this state,
    tampered or foreign bundle, nonsense lease times) or InvalidKey.
    """
    if blob.node_name != node_name:
        raise ReleaseInvalid(
            f"the release is for node {printable(blob.node_name, 64)!r}, not {node_name!r}; "
            "refusing it"
        )
    signer = verify_release(trust, blob)
    if not blob.sealed.pcr_indices:
        raise ReleaseInvalid("the release is not bound to any PCR; refusing it")
    if blob.policy_group:
        if approval is None:
            raise ReleaseInvalid("the release opens only under an approval; none was given")
        data_key = tpm.unseal_authorized(blob.sealed, approval, signer.key)
    else:
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
    bundle = parse_bundle(plaintext, node_name)
    if not signer.valid_at(bundle.issued_at):
        raise ReleaseInvalid(
            f"the release-signing certificate was not valid when the release was issued "
            f"({bundle.issued_at:%Y-%m-%d %H:%M} UTC; valid {signer.not_before:%Y-%m-%d} to "
            f"{signer.not_after:%Y-%m-%d}); refusing it"
        )
    return bundle


def parse_bundle(plaintext: bytes, node_name: str) -> Bundle:
    """The decrypted key bundle for ``node_name``: raises ReleaseInvalid or InvalidKey."""
    msg = pb.KeyBundle()
    try:
        msg.ParseFromString(plaintext)
    except DecodeError:
        raise ReleaseInvalid("the key bundle is malformed") from None
    if msg.node_name != node_name:
        raise ReleaseInvalid(
            f"the key bundle names node {printable(msg.node_name, 64)!r}, not {node_name!r}"
        )
    issued_at, not_after = _lease(msg.issued_at_unix, msg.not_after_unix)
    keys = tuple(
        InstallableKey(name=k.name, version=k.version, pem=Secret(k.private_key_pem))
        for k in msg.keys
    )
    for key in keys:
        validate_private_key_pem(key.name, key.pem)
        validate_version(key.name, key.version)
    return Bundle(
        node_name=msg.node_name,
        issued_at=issued_at,
        not_after=not_after,
        keys=keys,
        lease_clock_limit=msg.lease_clock_limit,
    )


def _lease(issued_at: int, not_after: int) -> tuple[datetime, datetime]:
    """The lease's times, or ReleaseInvalid when they make no sense (a value no date can hold,
    e.g. 2**62, is refused, never a crash)."""
    if not (EARLIEST <= issued_at <= LATEST and EARLIEST <= not_after <= LATEST):
        raise ReleaseInvalid(
            f"the release's lease times are out of range (issued_at {issued_at}, not_after "
            f"{not_after}); refusing it"
        )
    if not issued_at < not_after <= issued_at + MAX_LEASE_SECONDS:
        raise ReleaseInvalid(
            f"the release's lease is not a lease: not_after {not_after} must be after issued_at "
            f"{issued_at} by at most {MAX_LEASE_SECONDS} s; refusing it"
        )
    return datetime.fromtimestamp(issued_at, UTC), datetime.fromtimestamp(not_after, UTC)

"""The keylease.v1 wire contract, shared by the broker and the agent.

Generated modules: ``keylease_pb2`` and ``keylease_pb2_grpc`` (regenerate with ``make proto``).
This package also holds the few pure functions both sides must compute identically.
"""

import hashlib
from dataclasses import dataclass

__all__ = ["VERDICT_DENIED", "VERDICT_KEY", "SealedImport", "bundle_aad", "qualifying_data"]

NONCE_BYTES = 32
# Trailing metadata of a refusal that is a verdict on the authenticated node (see keylease.proto):
# the only answer on which an agent removes its keys.
VERDICT_KEY = "keylease-verdict"
VERDICT_DENIED = "denied"


@dataclass(frozen=True)
class SealedImport:
    """A release's TPM2_Import blob: the broker makes it (``kbs.tpm.sealing.seal_to_ek``), the
    agent's TPM opens it (``agent.tpm.Tpm.unseal_import``); the ``Release`` message carries it."""

    duplicate: bytes  # marshalled TPM2B_PRIVATE
    in_sym_seed: bytes  # marshalled TPM2B_ENCRYPTED_SECRET
    sealed_public: bytes  # marshalled TPM2B_PUBLIC
    pcr_bank: str
    pcr_indices: tuple[int, ...]


def qualifying_data(nonce: bytes) -> bytes:
    """qualifyingData the agent passes to TPM2_Quote: SHA-256("keylease.v1 quote" 0x00 nonce).

    The label keeps a keylease quote from ever meaning anything to another protocol that uses
    the same AK; the nonce makes it fresh and single-use.
    """
    return hashlib.sha256(b"keylease.v1 quote\x00" + nonce).digest()


def bundle_aad(node_name: str, sealed_public: bytes) -> bytes:
    """Associated data binding a release's AES-GCM bundle to its node and sealed object."""
    name = node_name.encode()
    return b"keylease.v1 bundle\x00" + len(name).to_bytes(2, "big") + name + sealed_public

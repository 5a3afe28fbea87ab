"""The keylease.v1 wire contract, shared by the broker and the agent.

Generated modules: ``keylease_pb2`` and ``keylease_pb2_grpc`` (regenerate with ``make proto``).
This package also holds the few pure functions both sides must compute identically.
"""

import hashlib
from dataclasses import dataclass

__all__ = ["SealedImport", "bundle_aad", "qualifying_data"]

NONCE_BYTES = 32
EPHEMERAL_PUBLIC_BYTES = 32


@dataclass(frozen=True)
class SealedImport:
    """A release's TPM2_Import blob: the broker makes it (``kbs.sealing.seal_to_ek``), the agent's
    TPM opens it (``agent.tpm.Tpm.unseal_import``); the ``Release`` message carries it."""

    duplicate: bytes  # marshalled TPM2B_PRIVATE
    in_sym_seed: bytes  # marshalled TPM2B_ENCRYPTED_SECRET
    sealed_public: bytes  # marshalled TPM2B_PUBLIC
    pcr_bank: str
    pcr_indices: tuple[int, ...]


def qualifying_data(nonce: bytes, ephemeral_public: bytes) -> bytes:
    """qualifyingData the agent passes to TPM2_Quote: SHA-256(nonce || ephemeral public key)."""
    return hashlib.sha256(nonce + ephemeral_public).digest()


def bundle_aad(node_name: str, sealed_public: bytes) -> bytes:
    """Associated data binding a release's AES-GCM bundle to its node and sealed object."""
    name = node_name.encode()
    return b"keylease.v1 bundle\x00" + len(name).to_bytes(2, "big") + name + sealed_public

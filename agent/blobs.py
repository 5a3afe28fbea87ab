"""The bytes the agent carries between the TPM, the broker and its state directory.

Frozen dataclasses of bytes: the TPM facade (``agent.tpm``) makes the AK, EK and quote values,
the broker client (``agent.broker``) makes releases, the state directory and the sealed cache
keep them. No ESAPI object and no protobuf message: each of those stays at its edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from keylease.api.v1 import SealedImport

__all__ = ["AkBlobs", "EkInfo", "Quote", "ReleaseBlob"]


@dataclass(frozen=True)
class AkBlobs:
    public: bytes  # marshalled TPM2B_PUBLIC
    private: bytes  # marshalled TPM2B_PRIVATE (wrapped by the TPM; useless elsewhere)


@dataclass(frozen=True)
class EkInfo:
    certificate: bytes  # DER from NV 0x01c00002 (RSA-2048) or 0x01c0000a (ECC P-256)
    public: bytes  # marshalled TPM2B_PUBLIC of the EK that certificate certifies


@dataclass(frozen=True)
class Quote:
    attest: bytes  # marshalled TPM2B_ATTEST as TPM2_Quote returned it
    signature: bytes  # marshalled TPMT_SIGNATURE
    banks: Mapping[str, Mapping[int, bytes]]  # the quoted PCR values per bank, read after it


@dataclass(frozen=True)
class ReleaseBlob:
    """A release as the broker sent it: a data key sealed to this TPM's EK and PCRs, and the
    AES-GCM bundle that key opens (``agent.release.open_release``). Useless without this TPM in
    the attested state, so it is also the at-rest cache (``agent.keystore.cache``)."""

    node_name: str
    sealed: SealedImport
    bundle_nonce: bytes
    bundle_ciphertext: bytes

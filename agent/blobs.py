"""The bytes the agent carries between the TPM, the broker and its state directory.

Frozen dataclasses of bytes: the TPM facade (``agent.tpm``) makes the AK, EK and quote values,
the broker client (``agent.broker``) makes releases, the state directory and the sealed cache
keep them. No ESAPI object and no protobuf message: each of those stays at its edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from keylease.api.v1 import SealedImport
from keylease.api.v1.approvals import Approval
from keylease.secret import Secret

__all__ = ["AkBlobs", "Credential", "EkInfo", "NodeIdentity", "Quote", "ReleaseBlob"]


@dataclass(frozen=True)
class AkBlobs:
    public: bytes  # marshalled TPM2B_PUBLIC
    private: bytes  # marshalled TPM2B_PRIVATE (wrapped by the TPM; useless elsewhere)


@dataclass(frozen=True)
class Credential:
    """The broker's enrollment challenge (MakeCredential to the EK, for the AK), kept in the state
    directory: only this TPM can open it again (ActivateCredential), recovering the secret the
    node key is derived from. Public bytes: a copy is useless without the TPM."""

    credential_blob: bytes  # marshalled TPM2B_ID_OBJECT
    encrypted_secret: bytes  # marshalled TPM2B_ENCRYPTED_SECRET


@dataclass(frozen=True)
class NodeIdentity:
    """What every call after enrollment is authenticated with: the node's name and its key
    (``keylease.api.v1.nodeauth``), held in memory only."""

    node_name: str
    key: Secret


@dataclass(frozen=True)
class EkInfo:
    certificate: bytes  # DER from NV 0x01c00002 (RSA-2048) or 0x01c0000a (ECC P-256)
    public: bytes  # marshalled TPM2B_PUBLIC of the EK that certificate certifies


@dataclass(frozen=True)
class Quote:
    attest: bytes  # marshalled TPM2B_ATTEST as TPM2_Quote returned it
    signature: bytes  # marshalled TPMT_SIGNATURE
    banks: Mapping[str, Mapping[int, bytes]]  # the quoted PCR values per bank, read after it
    clock: int = 0  # the TPM clock the quote reports (TPMS_CLOCK_INFO.clock, ms)


@dataclass(frozen=True)
class ReleaseBlob:
    """A release as the broker sent it: a data key sealed to this TPM's EK, opening only under
    the broker's approvals (or, from a broker before issue 11, in the attested PCR state), and the
    AES-GCM bundle that key opens (``agent.release.open_release``). Useless without this TPM in
    an approved state, so it is also the at-rest cache (``agent.keystore.cache``). The broker
    signs it (``agent.signature`` checks that before anything is installed or cached)."""

    node_name: str
    sealed: SealedImport
    bundle_nonce: bytes
    bundle_ciphertext: bytes
    signing_certificate: bytes  # the broker's release-signing certificate, DER
    signature: bytes  # over keylease.api.v1.signing.release_payload()
    policy_group: str = ""  # what the sealed object is bound to ("": PolicyPCR, before issue 11)
    approvals: tuple[Approval, ...] = ()  # as the broker sent them; checked before use

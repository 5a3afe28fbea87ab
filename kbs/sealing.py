"""TPM-bound release: a data key sealed to one TPM's EK under a PolicyPCR (no TPM needed).

The broker builds a keyedhash sealed-data object holding the data key, whose authPolicy is
PolicyPCR over the attested PCR values, and duplicates it to the node's EK with an outer wrapper
only (``tpm2_pytss.utils.wrap``, the go-tpm-tools pattern). The agent imports it under its EK and
unseals it in a PolicyPCR session (``agent.tpm.Tpm.unseal_import``). Only that TPM, with those
PCR values, recovers the key. fixedTPM/fixedParent are clear (TPM2_Import requires it) and
userWithAuth is clear, so the object opens by policy only.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from tpm2_pytss import (
    TPM2_ALG,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE,
    TPMA_OBJECT,
    TPML_PCR_SELECTION,
    TPMT_PUBLIC,
    TPMT_SENSITIVE,
    TPMU_SENSITIVE_COMPOSITE,
    TSS2_Exception,
)
from tpm2_pytss.utils import wrap

from kbs.api.secret import Secret
from kbs.credential import check_storage_key
from kbs.errors import InvalidRequest
from kbs.tpm_objects import TpmPublic

__all__ = ["MAX_SEALED_BYTES", "SealedImport", "policy_pcr_digest", "seal_to_ek"]

MAX_SEALED_BYTES = 128  # TPM2_Create/Import refuse more in a sealed data object (0x1d5)
SEALED_BANK = "sha256"
TPM_CC_POLICY_PCR = 0x0000017F
_DIGEST_BYTES = 32


@dataclass(frozen=True)
class SealedImport:
    duplicate: bytes  # marshalled TPM2B_PRIVATE
    in_sym_seed: bytes  # marshalled TPM2B_ENCRYPTED_SECRET
    sealed_public: bytes  # marshalled TPM2B_PUBLIC
    pcr_bank: str
    pcr_indices: tuple[int, ...]


def _checked(bank: str, pcrs: Mapping[int, bytes]) -> list[int]:
    if bank != SEALED_BANK:
        raise InvalidRequest(f"cannot seal to PCR bank {bank[:32]!r}; only sha256 is supported")
    if not pcrs:
        raise InvalidRequest("refusing to seal to an empty PCR set: the release would be unbound")
    indices = sorted(pcrs)
    for index in indices:
        if not 0 <= index < 24:
            raise InvalidRequest(f"PCR index {index} is out of range (0-23)")
        if len(pcrs[index]) != _DIGEST_BYTES:
            raise InvalidRequest(f"PCR {index} value must be {_DIGEST_BYTES} bytes")
    return indices


def _selection(indices: list[int]) -> bytes:
    """Marshalled TPML_PCR_SELECTION: one sha256 bank, 3-byte bitmap, as the agent sends it."""
    selection = TPML_PCR_SELECTION.parse(f"{SEALED_BANK}:{','.join(map(str, indices))}")
    return bytes(selection.marshal())


def policy_pcr_digest(bank: str, pcrs: Mapping[int, bytes]) -> bytes:
    """The policy digest a trial session reaches after TPM2_PolicyPCR over exactly ``pcrs``.

    policyDigest = SHA256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || SHA256(values)),
    values concatenated in ascending index order.
    """
    indices = _checked(bank, pcrs)
    pcr_digest = hashlib.sha256(b"".join(pcrs[i] for i in indices)).digest()
    return hashlib.sha256(
        bytes(_DIGEST_BYTES)
        + struct.pack(">I", TPM_CC_POLICY_PCR)
        + _selection(indices)
        + pcr_digest
    ).digest()


def seal_to_ek(
    ek: TpmPublic, data_key: Secret, pcr_bank: str, pcrs: Mapping[int, bytes]
) -> SealedImport:
    """Seal ``data_key`` so that only the TPM holding ``ek``, with these PCR values, opens it."""
    indices = _checked(pcr_bank, pcrs)
    check_storage_key(ek)
    secret = data_key.reveal()
    if not 0 < len(secret) <= MAX_SEALED_BYTES:
        raise InvalidRequest(f"sealed data must be 1 to {MAX_SEALED_BYTES} bytes")
    seed = os.urandom(_DIGEST_BYTES)
    public = TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT(0),
            authPolicy=policy_pcr_digest(pcr_bank, pcrs),
        )
    )
    public.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    public.publicArea.unique.keyedHash = hashlib.sha256(seed + secret).digest()
    sensitive = TPM2B_SENSITIVE(
        sensitiveArea=TPMT_SENSITIVE(
            sensitiveType=TPM2_ALG.KEYEDHASH,
            seedValue=seed,
            sensitive=TPMU_SENSITIVE_COMPOSITE(bits=secret),
        )
    )
    try:
        _, duplicate, in_sym_seed = wrap(ek.area, public, sensitive)
    except (TSS2_Exception, ValueError) as exc:
        raise InvalidRequest(f"cannot seal to this EK: {exc}") from None
    return SealedImport(
        duplicate=bytes(duplicate.marshal()),
        in_sym_seed=bytes(in_sym_seed.marshal()),
        sealed_public=bytes(public.marshal()),
        pcr_bank=pcr_bank,
        pcr_indices=tuple(indices),
    )

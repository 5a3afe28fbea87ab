"""TPM-bound release: a data key sealed to one TPM's EK under a PolicyPCR (no TPM needed).

The broker builds a keyedhash sealed-data object holding the data key, whose authPolicy is
PolicyPCR over the attested PCR values, and duplicates it to the node's EK with an outer wrapper
only (the go-tpm-tools pattern; ``kbs.tpm.credential.outer_wrap``, the same bytes as
``tpm2_pytss.utils.wrap`` in about a fifth of the time). The agent imports it under its EK and
unseals it in a PolicyPCR session (``agent.tpm.Tpm.unseal_import``). Only that TPM, with those
PCR values, recovers the key. fixedTPM/fixedParent are clear (TPM2_Import requires it) and
userWithAuth is clear, so the object opens by policy only. The public area is marshalled here
by hand (``struct``), not through tpm2-pytss types.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping

from kbs.errors import InvalidRequest
from kbs.tpm.credential import outer_wrap, storage_parent
from kbs.tpm.objects import TpmPublic
from keylease.api.v1 import SealedImport
from keylease.secret import Secret

__all__ = ["MAX_SEALED_BYTES", "SealedImport", "policy_pcr_digest", "seal_to_ek"]

MAX_SEALED_BYTES = 128  # TPM2_Create/Import refuse more in a sealed data object (0x1d5)
SEALED_BANKS = {"sha1": (0x0004, 20), "sha256": (0x000B, 32), "sha384": (0x000C, 48)}
TPM_CC_POLICY_PCR = 0x0000017F
_DIGEST_BYTES = 32
_TPM_ALG_SHA256 = 0x000B
_TPM_ALG_KEYEDHASH = 0x0008
_TPM_ALG_NULL = 0x0010
_DUPLICATE = b"DUPLICATE\x00"


def _checked(bank: str, pcrs: Mapping[int, bytes]) -> list[int]:
    if bank not in SEALED_BANKS:
        raise InvalidRequest(
            f"cannot seal to PCR bank {bank[:32]!r}; use one of {', '.join(SEALED_BANKS)}"
        )
    if not pcrs:
        raise InvalidRequest("refusing to seal to an empty PCR set: the release would be unbound")
    indices = sorted(pcrs)
    size = SEALED_BANKS[bank][1]
    for index in indices:
        if not 0 <= index < 24:
            raise InvalidRequest(f"PCR index {index} is out of range (0-23)")
        if len(pcrs[index]) != size:
            raise InvalidRequest(f"PCR {index} value must be {size} bytes in the {bank} bank")
    return indices


def _selection(bank: str, indices: list[int]) -> bytes:
    """Marshalled TPML_PCR_SELECTION: one bank, 3-byte bitmap, as the agent selects it."""
    bitmap = bytearray(3)
    for i in indices:
        bitmap[i // 8] |= 1 << (i % 8)
    return struct.pack(">IHB", 1, SEALED_BANKS[bank][0], 3) + bytes(bitmap)


def policy_pcr_digest(bank: str, pcrs: Mapping[int, bytes]) -> bytes:
    """The policy digest a trial session reaches after TPM2_PolicyPCR over exactly ``pcrs``.

    policyDigest = SHA256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || SHA256(values)),
    values (of ``bank``, whatever its digest size) concatenated in ascending index order: the
    session's hash is SHA-256, the object's nameAlg.
    """
    indices = _checked(bank, pcrs)
    pcr_digest = hashlib.sha256(b"".join(pcrs[i] for i in indices)).digest()
    return hashlib.sha256(
        bytes(_DIGEST_BYTES)
        + struct.pack(">I", TPM_CC_POLICY_PCR)
        + _selection(bank, indices)
        + pcr_digest
    ).digest()


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def seal_to_ek(
    ek: TpmPublic, data_key: Secret, pcr_bank: str, pcrs: Mapping[int, bytes]
) -> SealedImport:
    """Seal ``data_key`` so that only the TPM holding ``ek``, with these PCR values, opens it."""
    indices = _checked(pcr_bank, pcrs)
    storage_parent(ek)  # refuse a non-storage EK before anything else
    secret = data_key.reveal()
    if not 0 < len(secret) <= MAX_SEALED_BYTES:
        raise InvalidRequest(f"sealed data must be 1 to {MAX_SEALED_BYTES} bytes")
    seed = os.urandom(_DIGEST_BYTES)
    # TPMT_PUBLIC: keyedhash, nameAlg sha256, no attributes, authPolicy = PolicyPCR digest,
    # scheme NULL, unique = H(seedValue || data) (TPM 2.0 Part 1, 27.7.3).
    area = (
        struct.pack(">HHI", _TPM_ALG_KEYEDHASH, _TPM_ALG_SHA256, 0)
        + _tpm2b(policy_pcr_digest(pcr_bank, pcrs))
        + struct.pack(">H", _TPM_ALG_NULL)
        + _tpm2b(hashlib.sha256(seed + secret).digest())
    )
    name = struct.pack(">H", _TPM_ALG_SHA256) + hashlib.sha256(area).digest()
    # TPMT_SENSITIVE: keyedhash, empty authValue, seedValue, sealed data.
    sensitive = _tpm2b(
        struct.pack(">H", _TPM_ALG_KEYEDHASH) + _tpm2b(b"") + _tpm2b(seed) + _tpm2b(secret)
    )
    duplicate, in_sym_seed = outer_wrap(ek, _DUPLICATE, name, sensitive)
    return SealedImport(
        duplicate=duplicate,
        in_sym_seed=in_sym_seed,
        sealed_public=_tpm2b(area),
        pcr_bank=pcr_bank,
        pcr_indices=tuple(indices),
    )

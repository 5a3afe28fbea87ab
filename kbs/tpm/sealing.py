"""TPM-bound release: a data key sealed to one TPM's EK under an authorization policy (no TPM
needed).

The broker builds a keyedhash sealed-data object holding the data key, whose authPolicy is
PolicyAuthorize by the broker's release-signing key for one node and policy group
(``keylease.api.v1.tpmpolicy.sealed_auth_policy``): it opens under an approval signed by that key
for the PCR values the TPM holds, before the approval's TPM-clock limit. It is duplicated to the
node's EK with an outer wrapper only (the go-tpm-tools pattern; ``kbs.tpm.credential.outer_wrap``,
the same bytes as ``tpm2_pytss.utils.wrap`` in about a fifth of the time). The agent imports it
under its EK and unseals it in a policy session (``agent.tpm.Tpm.unseal_authorized``). Only that
TPM, in an approved state, recovers the key. fixedTPM/fixedParent are clear (TPM2_Import requires
it) and userWithAuth is clear, so the object opens by policy only. The public area is marshalled
here by hand (``struct``), not through tpm2-pytss types. ``seal_to_ek`` takes any authPolicy: a
PolicyPCR digest (``tpmpolicy.policy_pcr_digest``) gives the binding of releases before issue 11.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence

from kbs.errors import InvalidRequest
from kbs.tpm.credential import outer_wrap, storage_parent
from kbs.tpm.objects import TpmPublic
from keylease.api.v1 import SealedImport
from keylease.api.v1.tpmpolicy import BANKS
from keylease.secret import Secret

__all__ = ["MAX_SEALED_BYTES", "SealedImport", "seal_to_ek"]

MAX_SEALED_BYTES = 128  # TPM2_Create/Import refuse more in a sealed data object (0x1d5)
_DIGEST_BYTES = 32
_TPM_ALG_SHA256 = 0x000B
_TPM_ALG_KEYEDHASH = 0x0008
_TPM_ALG_NULL = 0x0010
_DUPLICATE = b"DUPLICATE\x00"


def _checked(bank: str, indices: Sequence[int]) -> tuple[int, ...]:
    if bank not in BANKS:
        raise InvalidRequest(
            f"cannot seal to PCR bank {bank[:32]!r}; use one of {', '.join(BANKS)}"
        )
    if not indices:
        raise InvalidRequest("refusing to seal to an empty PCR set: the release would be unbound")
    ordered = tuple(sorted(set(indices)))
    if any(not 0 <= i < 24 for i in ordered):
        raise InvalidRequest(f"PCR index {ordered[-1]} is out of range (0-23)")
    return ordered


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def seal_to_ek(
    ek: TpmPublic,
    data_key: Secret,
    auth_policy: bytes,
    pcr_bank: str,
    pcr_indices: Sequence[int],
) -> SealedImport:
    """Seal ``data_key`` so that only the TPM holding ``ek`` opens it, under ``auth_policy``
    (a SHA-256 policy digest); ``pcr_bank``/``pcr_indices`` say which PCRs that policy (or the
    approvals it accepts) covers."""
    indices = _checked(pcr_bank, pcr_indices)
    storage_parent(ek)  # refuse a non-storage EK before anything else
    if len(auth_policy) != _DIGEST_BYTES:
        raise InvalidRequest("an authPolicy is a SHA-256 digest (32 bytes)")
    secret = data_key.reveal()
    if not 0 < len(secret) <= MAX_SEALED_BYTES:
        raise InvalidRequest(f"sealed data must be 1 to {MAX_SEALED_BYTES} bytes")
    seed = os.urandom(_DIGEST_BYTES)
    # TPMT_PUBLIC: keyedhash, nameAlg sha256, no attributes, authPolicy, scheme NULL,
    # unique = H(seedValue || data) (TPM 2.0 Part 1, 27.7.3).
    area = (
        struct.pack(">HHI", _TPM_ALG_KEYEDHASH, _TPM_ALG_SHA256, 0)
        + _tpm2b(auth_policy)
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
        pcr_indices=indices,
    )

"""Opening a release's sealed data key: TPM2_Import under the EK, then Unseal under PolicyPCR."""

from __future__ import annotations

from typing import Any

from tpm2_pytss import (
    TPM2_ALG,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMT_SYM_DEF_OBJECT,
    TSS2_Exception,
)

from agent.errors import ReleaseInvalid
from agent.tpm.identity import EndorsementKey
from agent.tpm.quote import QUOTE_BANKS, pcr_selection
from agent.tpm.sessions import endorsement_session, flush, policy_session
from agent.tpm.tss2 import unmarshal, unseal_error
from keylease.api.v1 import SealedImport
from keylease.secret import Secret

__all__ = ["unseal_import"]


def unseal_import(esys: Any, ek: EndorsementKey, sealed: SealedImport) -> Secret:
    """Import a sealed object duplicated to this TPM's EK and unseal it under PolicyPCR.

    Raises ReleaseInvalid when the blobs are malformed, were made for another TPM's EK, or
    the PCRs no longer hold the sealed values; TpmError/TpmUnavailable when the TPM fails.
    """
    indices = _check_indices(sealed)
    public = unmarshal(TPM2B_PUBLIC, sealed.sealed_public, "sealed_public", ReleaseInvalid)
    duplicate = unmarshal(TPM2B_PRIVATE, sealed.duplicate, "duplicate", ReleaseInvalid)
    seed = unmarshal(TPM2B_ENCRYPTED_SECRET, sealed.in_sym_seed, "in_sym_seed", ReleaseInvalid)
    area = public.publicArea
    if area.type != TPM2_ALG.KEYEDHASH or area.objectAttributes & TPMA_OBJECT.USERWITHAUTH:
        raise ReleaseInvalid("the sealed object is not a policy-only sealed data object")
    try:
        with ek.parent() as parent:
            with endorsement_session(esys) as session:
                private = esys.import_(
                    parent,
                    b"",
                    public,
                    duplicate,
                    seed,
                    TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                    session1=session,
                )
            with endorsement_session(esys) as session:
                handle = esys.load(parent, private, public, session1=session)
            try:
                with policy_session(esys) as session:
                    esys.policy_pcr(session, b"", pcr_selection(sealed.pcr_bank, indices))
                    data = esys.unseal(handle, session1=session)
            finally:
                flush(esys, handle)
    except TSS2_Exception as exc:
        raise unseal_error(exc) from None
    return Secret(bytes(data))


def _check_indices(sealed: SealedImport) -> tuple[int, ...]:
    if sealed.pcr_bank not in QUOTE_BANKS:
        raise ReleaseInvalid(
            f"the release is sealed to PCR bank {sealed.pcr_bank[:32]!r}, not one of "
            f"{', '.join(QUOTE_BANKS)}"
        )
    indices = tuple(sealed.pcr_indices)
    if not indices:
        raise ReleaseInvalid("the release is not bound to any PCR; refusing it")
    if list(indices) != sorted(set(indices)) or any(not 0 <= i < 24 for i in indices):
        raise ReleaseInvalid(f"the release names invalid PCR indices {list(indices)}")
    return indices

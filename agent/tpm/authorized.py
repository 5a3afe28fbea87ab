"""Opening a release bound to approvals: TPM2_Import under the EK, then Unseal in a policy
session satisfying PolicyAuthorize with the broker's approval (``keylease.api.v1.tpmpolicy``).

The TPM decides: TPM2_LoadExternal of the broker's signing key (owner hierarchy: a NULL-hierarchy
ticket does not satisfy PolicyAuthorize), TPM2_VerifySignature of the approval's authorization
over SHA-256(approvedPolicy || policyRef) gives a ticket (the key is flushed at once), then in one
session PolicyPCR(the approved values), PolicyCounterTimer(clock < limit), PolicyAuthorize(the
approved policy, policyRef, the key's name, the ticket) and Unseal. At most the EK and one other
object are loaded at once; every handle and session is flushed in ``finally``. Each refusal says
which step refused: the authorization (not the broker's key), the PCR values, the TPM-clock limit,
the node or policy group.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_EO,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_NAME,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF_OBJECT,
    TSS2_Exception,
)

from agent.errors import ReleaseInvalid
from agent.tpm.identity import EndorsementKey
from agent.tpm.quote import pcr_selection
from agent.tpm.sessions import endorsement_session, flush, policy_session
from agent.tpm.tss2 import tpm_error, unmarshal
from keylease.api.v1 import SealedImport
from keylease.api.v1.approvals import Approval
from keylease.api.v1.tpmpolicy import (
    TPMS_TIME_INFO_CLOCK,
    policy_ref,
    signing_key_name,
    signing_key_public,
)
from keylease.secret import Secret

__all__ = ["unseal_authorized"]

_FMT1 = 0x080
_TPM_WARNING = 0x800


def _refused(step: str, exc: TSS2_Exception, reason: str) -> Exception:
    rc = int(exc.rc)
    if rc & 0xFF0000 or (not rc & _FMT1 and rc & _TPM_WARNING):
        return tpm_error(step, exc)  # the TPM failed, not the approval
    return ReleaseInvalid(
        f"the sealed release does not open with the approval: {reason} ({step}, rc 0x{rc:x})"
    )


def _signature(der: bytes) -> Any:
    try:
        r, s = decode_dss_signature(der)
    except ValueError:
        raise ReleaseInvalid("the approval's authorization is not an ECDSA signature") from None
    sig = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA)
    sig.signature.ecdsa.hash = TPM2_ALG.SHA256
    sig.signature.ecdsa.signatureR = r.to_bytes(32, "big")
    sig.signature.ecdsa.signatureS = s.to_bytes(32, "big")
    return sig


def _ticket(esys: Any, key: ec.EllipticCurvePublicKey, approval: Approval) -> Any:
    area = signing_key_public(key)
    public = unmarshal(TPM2B_PUBLIC, struct.pack(">H", len(area)) + area, "key", ReleaseInvalid)
    digest = hashlib.sha256(approval.authorization_message()).digest()
    try:
        handle = esys.load_external(public, None, ESYS_TR.OWNER)
    except TSS2_Exception as exc:
        raise _refused("LoadExternal", exc, "the signing key does not load") from None
    try:
        return esys.verify_signature(handle, digest, _signature(approval.authorization))
    except TSS2_Exception as exc:
        raise _refused(
            "VerifySignature", exc, "its authorization is not the release-signing key's signature"
        ) from None
    finally:
        flush(esys, handle)


def unseal_authorized(
    esys: Any,
    ek: EndorsementKey,
    sealed: SealedImport,
    approval: Approval,
    key: ec.EllipticCurvePublicKey,
) -> Secret:
    """The data key of ``sealed`` (bound to PolicyAuthorize by ``key``), opened under
    ``approval``. Raises ReleaseInvalid naming the step the TPM refused; TpmError/TpmUnavailable
    when the TPM fails."""
    public = unmarshal(TPM2B_PUBLIC, sealed.sealed_public, "sealed_public", ReleaseInvalid)
    duplicate = unmarshal(TPM2B_PRIVATE, sealed.duplicate, "duplicate", ReleaseInvalid)
    seed = unmarshal(TPM2B_ENCRYPTED_SECRET, sealed.in_sym_seed, "in_sym_seed", ReleaseInvalid)
    ticket = _ticket(esys, key, approval)
    values = hashlib.sha256(b"".join(v for _, v in approval.pcrs)).digest()
    limit = struct.pack(">Q", approval.clock_limit)
    ref = policy_ref(approval.node_name, approval.policy_group)
    with ek.parent() as parent:
        try:
            with endorsement_session(esys) as session:
                private = esys.import_(
                    parent, b"", public, duplicate, seed,
                    TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL), session1=session,
                )  # fmt: skip
            with endorsement_session(esys) as session:
                handle = esys.load(parent, private, public, session1=session)
        except TSS2_Exception as exc:
            raise _refused(
                "Import", exc, "it was made for another TPM's EK or is damaged"
            ) from None
        try:
            with policy_session(esys) as session:
                _step(esys.policy_pcr, "PolicyPCR", "this TPM's PCRs are not the approved values",
                      session, values, pcr_selection(approval.bank, approval.indices))  # fmt: skip
                _step(esys.policy_counter_timer, "PolicyCounterTimer",
                      f"the approval expired (TPM clock limit {approval.clock_limit})", session,
                      operand_b=limit, operation=TPM2_EO.UNSIGNED_LT,
                      offset=TPMS_TIME_INFO_CLOCK)  # fmt: skip
                _step(esys.policy_authorize, "PolicyAuthorize",
                      "the signature ticket does not match the approval",
                      session, approved_policy=approval.approved_policy(), policy_ref=ref,
                      key_sign=TPM2B_NAME(signing_key_name(key)), check_ticket=ticket)  # fmt: skip
                data = _step(esys.unseal, "Unseal",
                             "it is for another node, policy group or signing key than this "
                             "release is bound to",
                             handle, session1=session)  # fmt: skip
        finally:
            flush(esys, handle)
    return Secret(bytes(data))


def _step(fn: Any, name: str, reason: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except TSS2_Exception as exc:
        raise _refused(name, exc, reason) from None

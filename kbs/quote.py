"""Quote verification (DESIGN.md step 2), in a fixed order, raising a specific error at each step.

1. structure: TPM2B_ATTEST and TPMT_SIGNATURE unmarshal exactly (else ``InvalidRequest``)
2. signature over the attestation bytes with the enrolled AK (``IncorrectSignature``)
3. magic TPM_GENERATED_VALUE, type TPM_ST_ATTEST_QUOTE, signer is the AK
   (``QuoteStructureInvalid``)
4. qualifying data = H(nonce || ephemeral public key) (``QualifyingDataMismatch``)
5. one selection, over the requested bank; the PCRs sent are exactly the signed selection and it
   covers every PCR policy requires (``PcrSelectionMismatch``)
6. the PCR values sent hash to the signed digest (``PcrDigestMismatch``)

Nothing in the attestation is interpreted before its signature has been checked.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import (
    TPM2_ALG,
    TPM2_GENERATED,
    TPM2_ST,
    TPMS_ATTEST,
    TPMT_SIGNATURE,
    TSS2_Exception,
)

from kbs.errors import (
    IncorrectSignature,
    InvalidRequest,
    PcrDigestMismatch,
    PcrSelectionMismatch,
    QualifyingDataMismatch,
    QuoteStructureInvalid,
)
from kbs.tpm_objects import TpmPublic

__all__ = ["BANKS", "VerifiedQuote", "verify_quote"]

BANKS = {"sha256": (TPM2_ALG.SHA256, hashlib.sha256)}
TPM_RH_ENDORSEMENT = 0x4000000B


@dataclass(frozen=True)
class VerifiedQuote:
    pcr_bank: str
    pcrs: Mapping[int, bytes]  # the signed selection's values, verified against the digest
    reset_count: int
    restart_count: int
    clock: int


def _unmarshal_attest(quote: bytes) -> tuple[TPMS_ATTEST, bytes]:
    """TPM2B_ATTEST -> (parsed TPMS_ATTEST, the signed bytes). Exactly one encoding accepted."""
    if len(quote) < 2 or int.from_bytes(quote[:2], "big") != len(quote) - 2:
        raise InvalidRequest("quote is not a TPM2B_ATTEST (size prefix does not match)")
    body = quote[2:]
    try:
        attest, used = TPMS_ATTEST.unmarshal(body)
    except TSS2_Exception:
        raise InvalidRequest("quote is not a TPMS_ATTEST (truncated or garbage)") from None
    if used != len(body):
        raise InvalidRequest("quote has trailing bytes after the TPMS_ATTEST")
    return attest, body


def _unmarshal_signature(signature: bytes) -> TPMT_SIGNATURE:
    try:
        sig, used = TPMT_SIGNATURE.unmarshal(signature)
    except TSS2_Exception:
        raise InvalidRequest("signature is not a TPMT_SIGNATURE (truncated or garbage)") from None
    if used != len(signature):
        raise InvalidRequest("signature has trailing bytes after the TPMT_SIGNATURE")
    return sig


def _check_signature(ak: TpmPublic, sig: TPMT_SIGNATURE, signed: bytes) -> None:
    key = ak.key
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if sig.sigAlg != TPM2_ALG.ECDSA or sig.signature.ecdsa.hash != TPM2_ALG.SHA256:
                raise IncorrectSignature("the quote signature is not ECDSA-SHA256 as the AK needs")
            der = encode_dss_signature(
                int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big"),
                int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big"),
            )
            key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            if sig.sigAlg == TPM2_ALG.RSASSA and sig.signature.rsassa.hash == TPM2_ALG.SHA256:
                key.verify(
                    bytes(sig.signature.rsassa.sig), signed, padding.PKCS1v15(), hashes.SHA256()
                )
            elif sig.sigAlg == TPM2_ALG.RSAPSS and sig.signature.rsapss.hash == TPM2_ALG.SHA256:
                key.verify(
                    bytes(sig.signature.rsapss.sig),
                    signed,
                    padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO),
                    hashes.SHA256(),
                )
            else:
                raise IncorrectSignature("the quote signature is not RSASSA/RSAPSS-SHA256")
    except InvalidSignature:
        raise IncorrectSignature(
            "the quote signature does not verify with the enrolled AK: the quote was altered "
            "or made by another key"
        ) from None


def qualified_name(ek: TpmPublic, ak: TpmPublic) -> bytes:
    """The AK's qualified name when it was created under the EK (a primary of the EH)."""
    digest = hashlib.sha256
    ek_qn = ek.name[:2] + digest(TPM_RH_ENDORSEMENT.to_bytes(4, "big") + ek.name).digest()
    return ak.name[:2] + digest(ek_qn + ak.name).digest()


def _selection(attest: TPMS_ATTEST, bank: str) -> set[int]:
    selections = attest.attested.quote.pcrSelect
    if selections.count != 1:
        raise PcrSelectionMismatch(
            f"the quote must select PCRs of exactly one bank, it selects {selections.count}"
        )
    sel = selections.pcrSelections[0]
    if sel.hash != BANKS[bank][0]:
        raise PcrSelectionMismatch(f"the quote is not over the {bank} bank")
    bitmap = bytes(sel.pcrSelect)[: sel.sizeofSelect]
    return {8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1}


def verify_quote(
    ak: TpmPublic,
    quote: bytes,
    signature: bytes,
    qualifying_data: bytes,
    bank: str,
    pcrs: Mapping[int, bytes],
    *,
    required: Set[int] = frozenset(),
    ek: TpmPublic | None = None,
) -> VerifiedQuote:
    """Verify a TPM2_Quote made by ``ak``; return the verified PCR values. Raises QuoteInvalid."""
    if bank not in BANKS:
        raise InvalidRequest(f"unsupported PCR bank {bank[:32]!r}; use sha256")
    attest, signed = _unmarshal_attest(quote)
    sig = _unmarshal_signature(signature)
    _check_signature(ak, sig, signed)
    if attest.magic != TPM2_GENERATED.VALUE or attest.type != TPM2_ST.ATTEST_QUOTE:
        raise QuoteStructureInvalid(
            "the signed structure is not a TPM-generated quote (magic/type); the AK signed "
            "data that did not come from TPM2_Quote"
        )
    if ek is not None and bytes(attest.qualifiedSigner) != qualified_name(ek, ak):
        raise QuoteStructureInvalid("the quote's signer is not the enrolled AK under this EK")
    if not hmac.compare_digest(bytes(attest.extraData), qualifying_data):
        raise QualifyingDataMismatch(
            "the quote was made over another nonce or ephemeral key (qualifyingData differs); "
            "request a new nonce and quote again"
        )
    selected = _selection(attest, bank)
    if set(pcrs) != selected:
        raise PcrSelectionMismatch(
            f"PCRs sent ({_list(pcrs)}) are not the PCRs the quote signed ({_list(selected)})"
        )
    missing = sorted(set(required) - selected)
    if missing:
        raise PcrSelectionMismatch(f"PCRs {_list(missing)} required by policy are not quoted")
    hash_fn = BANKS[bank][1]
    size = hash_fn().digest_size
    if any(len(v) != size for v in pcrs.values()):
        raise InvalidRequest(f"every {bank} PCR value must be {size} bytes")
    digest = hash_fn(b"".join(pcrs[i] for i in sorted(pcrs))).digest()
    if not hmac.compare_digest(digest, bytes(attest.attested.quote.pcrDigest)):
        raise PcrDigestMismatch(
            "the PCR values sent do not hash to the digest the TPM signed: they were altered"
        )
    clock = attest.clockInfo
    return VerifiedQuote(
        pcr_bank=bank,
        pcrs={i: pcrs[i] for i in sorted(pcrs)},
        reset_count=int(clock.resetCount),
        restart_count=int(clock.restartCount),
        clock=int(clock.clock),
    )


def _list(indices: Iterable[int]) -> str:
    return ",".join(str(i) for i in sorted(indices)) or "none"

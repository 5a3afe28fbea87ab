"""Quote verification (DESIGN.md step 2), in a fixed order, raising a specific error at each step.

1. structure: TPM2B_ATTEST and TPMT_SIGNATURE unmarshal exactly (else ``InvalidRequest``)
2. signature over the attestation bytes with the enrolled AK (``IncorrectSignature``)
3. magic TPM_GENERATED_VALUE, type TPM_ST_ATTEST_QUOTE, signer is the AK
   (``QuoteStructureInvalid``)
4. qualifying data = H(label || nonce) (``QualifyingDataMismatch``)
5. the banks and PCRs sent are exactly the signed selection (one entry per bank, each of sha1,
   sha256 or sha384) and it covers every PCR policy requires (``PcrSelectionMismatch``)
6. the PCR values sent, banks in the selection's order and indices ascending, hash to the
   signed digest (``PcrDigestMismatch``)

Nothing in the attestation is interpreted before its signature has been checked. A quote's
TPMS_ATTEST and an ECDSA/RSA TPMT_SIGNATURE are parsed here with ``struct`` (TPM 2.0 Part 2,
10.12 and 11.3.4): through tpm2-pytss's types the two unmarshals cost more than the signature
check itself. Other attestation types and signature algorithms still go through tpm2-pytss, so
garbage is refused as garbage.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import TPM2_ALG, TPM2_GENERATED, TPMS_ATTEST, TPMT_SIGNATURE, TSS2_Exception

from kbs.errors import (
    IncorrectSignature,
    InvalidRequest,
    PcrDigestMismatch,
    PcrSelectionMismatch,
    QualifyingDataMismatch,
    QuoteStructureInvalid,
)
from kbs.tpm.objects import TpmPublic

__all__ = ["BANKS", "VerifiedQuote", "verify_quote"]

BANKS = {"sha1": (TPM2_ALG.SHA1, 20), "sha256": (TPM2_ALG.SHA256, 32),
         "sha384": (TPM2_ALG.SHA384, 48)}  # fmt: skip
_BANK_OF_ALG = {int(alg): name for name, (alg, _) in BANKS.items()}
TPM_RH_ENDORSEMENT = 0x4000000B
TPM_ST_ATTEST_QUOTE = 0x8018
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class VerifiedQuote:
    banks: Mapping[str, Mapping[int, bytes]]  # the signed selection's values, per bank
    reset_count: int
    restart_count: int
    clock: int


class _Reader:
    """Big-endian TPM wire reader over one byte string; reading past the end raises _Truncated."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _Truncated
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def tpm2b(self) -> bytes:
        return self.take(self.u16())


class _Truncated(Exception):
    """Internal: the structure ended early (becomes InvalidRequest at the boundary)."""


@dataclass(frozen=True)
class _Attest:
    """TPMS_ATTEST of a quote, parsed by hand (TPM 2.0 Part 2, 10.12.12)."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    selections: tuple[tuple[int, bytes], ...]  # (hash alg, pcrSelect bitmap)
    pcr_digest: bytes


@dataclass(frozen=True)
class _Signature:
    alg: int
    hash: int
    parts: tuple[bytes, ...]  # (R, S) for ECDSA, (sig,) for RSA


def _parse_quote_attest(body: bytes) -> _Attest | None:
    """A TPMS_ATTEST whose type is TPM_ST_ATTEST_QUOTE; None for other types."""
    r = _Reader(body)
    magic = r.u32()
    st = r.u16()
    if st != TPM_ST_ATTEST_QUOTE:
        return None
    signer = r.tpm2b()
    extra = r.tpm2b()
    clock, reset_count, restart_count, _safe = struct.unpack(">QIIB", r.take(17))
    r.take(8)  # firmwareVersion
    count = r.u32()
    if count > 16:  # TPM_NUM_PCR_BANKS bound, as the TSS unmarshaller applies
        raise _Truncated
    selections = []
    for _ in range(count):
        alg = r.u16()
        size = r.take(1)[0]
        if size > 4:  # PCR_SELECT_MAX
            raise _Truncated
        selections.append((alg, r.take(size)))
    digest = r.tpm2b()
    if r.pos != len(body):
        raise _Trailing
    return _Attest(
        magic, st, signer, extra, clock, reset_count, restart_count, tuple(selections), digest
    )


class _Trailing(Exception):
    """Internal: bytes after the structure."""


def _unmarshal_attest(quote: bytes) -> tuple[_Attest | None, bytes]:
    """TPM2B_ATTEST -> (parsed quote TPMS_ATTEST or None for another type, the signed bytes).

    Exactly one encoding accepted. An attestation of another type is still unmarshalled (with
    the TSS) so that garbage is refused as garbage before the signature is looked at.
    """
    if len(quote) < 2 or int.from_bytes(quote[:2], "big") != len(quote) - 2:
        raise InvalidRequest("quote is not a TPM2B_ATTEST (size prefix does not match)")
    body = quote[2:]
    try:
        parsed = _parse_quote_attest(body)
    except _Truncated:
        raise InvalidRequest("quote is not a TPMS_ATTEST (truncated or garbage)") from None
    except _Trailing:
        raise InvalidRequest("quote has trailing bytes after the TPMS_ATTEST") from None
    if parsed is None:
        try:
            _, used = TPMS_ATTEST.unmarshal(body)
        except TSS2_Exception:
            raise InvalidRequest("quote is not a TPMS_ATTEST (truncated or garbage)") from None
        if used != len(body):
            raise InvalidRequest("quote has trailing bytes after the TPMS_ATTEST")
    return parsed, body


def _unmarshal_signature(signature: bytes) -> _Signature:
    r = _Reader(signature)
    try:
        alg = r.u16()
        if alg == TPM2_ALG.ECDSA:
            sig = _Signature(alg, r.u16(), (r.tpm2b(), r.tpm2b()))
        elif alg in (TPM2_ALG.RSASSA, TPM2_ALG.RSAPSS):
            sig = _Signature(alg, r.u16(), (r.tpm2b(),))
        else:
            sig = _tss_signature(signature)
            r.pos = len(signature)
    except _Truncated:
        raise InvalidRequest("signature is not a TPMT_SIGNATURE (truncated or garbage)") from None
    if r.pos != len(signature):
        raise InvalidRequest("signature has trailing bytes after the TPMT_SIGNATURE")
    return sig


def _tss_signature(signature: bytes) -> _Signature:
    """Any other signature algorithm: unmarshal with the TSS (refused later as the wrong kind)."""
    try:
        sig, used = TPMT_SIGNATURE.unmarshal(signature)
    except TSS2_Exception:
        raise InvalidRequest("signature is not a TPMT_SIGNATURE (truncated or garbage)") from None
    if used != len(signature):
        raise InvalidRequest("signature has trailing bytes after the TPMT_SIGNATURE")
    return _Signature(int(sig.sigAlg), 0, ())


def _check_signature(ak: TpmPublic, sig: _Signature, signed: bytes) -> None:
    key = ak.key
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if sig.alg != TPM2_ALG.ECDSA or sig.hash != TPM2_ALG.SHA256:
                raise IncorrectSignature("the quote signature is not ECDSA-SHA256 as the AK needs")
            der = encode_dss_signature(
                int.from_bytes(sig.parts[0], "big"), int.from_bytes(sig.parts[1], "big")
            )
            key.verify(der, signed, _ECDSA_SHA256)
        elif isinstance(key, rsa.RSAPublicKey):
            if sig.alg == TPM2_ALG.RSASSA and sig.hash == TPM2_ALG.SHA256:
                key.verify(sig.parts[0], signed, padding.PKCS1v15(), hashes.SHA256())
            elif sig.alg == TPM2_ALG.RSAPSS and sig.hash == TPM2_ALG.SHA256:
                key.verify(
                    sig.parts[0],
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


def _selection(attest: _Attest) -> dict[str, list[int]]:
    """The signed selection: bank -> PCR indices, in the quote's order."""
    selected: dict[str, list[int]] = {}
    for alg, bitmap in attest.selections:
        bank = _BANK_OF_ALG.get(alg)
        if bank is None:
            raise PcrSelectionMismatch(
                f"the quote selects PCRs of algorithm 0x{alg:04x}; use sha1, sha256 or sha384"
            )
        if bank in selected:
            raise PcrSelectionMismatch(f"the quote selects the {bank} bank twice")
        selected[bank] = [
            8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1
        ]
    return selected


def verify_quote(
    ak: TpmPublic,
    quote: bytes,
    signature: bytes,
    qualifying_data: bytes,
    banks: Mapping[str, Mapping[int, bytes]],
    *,
    required: Mapping[str, Set[int]] | None = None,
    ek: TpmPublic | None = None,
) -> VerifiedQuote:
    """Verify a TPM2_Quote made by ``ak``; return the verified PCR values. Raises QuoteInvalid."""
    unknown = [b for b in banks if b not in BANKS]
    if unknown or not banks:
        raise InvalidRequest(
            f"unsupported PCR bank {unknown[0][:32] if unknown else 'none'!r}; use sha1, sha256 "
            "or sha384"
        )
    attest, signed = _unmarshal_attest(quote)
    sig = _unmarshal_signature(signature)
    _check_signature(ak, sig, signed)
    if attest is None or attest.magic != TPM2_GENERATED.VALUE:
        raise QuoteStructureInvalid(
            "the signed structure is not a TPM-generated quote (magic/type); the AK signed "
            "data that did not come from TPM2_Quote"
        )
    if ek is not None and attest.qualified_signer != qualified_name(ek, ak):
        raise QuoteStructureInvalid("the quote's signer is not the enrolled AK under this EK")
    if not hmac.compare_digest(attest.extra_data, qualifying_data):
        raise QualifyingDataMismatch(
            "the quote was made over another nonce (qualifyingData differs); "
            "request a new nonce and quote again"
        )
    selected = _selection(attest)
    if set(banks) != set(selected) or any(set(banks[b]) != set(selected[b]) for b in selected):
        raise PcrSelectionMismatch(
            f"PCRs sent ({_describe(banks)}) are not the PCRs the quote signed "
            f"({_describe(selected)})"
        )
    for bank, indices in (required or {}).items():
        missing = sorted(set(indices) - set(selected.get(bank, ())))
        if missing:
            raise PcrSelectionMismatch(
                f"PCRs {_list(missing)} ({bank}) required by policy are not quoted"
            )
    for bank, values in banks.items():
        size = BANKS[bank][1]
        if any(len(v) != size for v in values.values()):
            raise InvalidRequest(f"every {bank} PCR value must be {size} bytes")
    ordered = b"".join(banks[b][i] for b, indices in selected.items() for i in indices)
    if not hmac.compare_digest(hashlib.sha256(ordered).digest(), attest.pcr_digest):
        raise PcrDigestMismatch(
            "the PCR values sent do not hash to the digest the TPM signed: they were altered"
        )
    return VerifiedQuote(
        banks={b: {i: banks[b][i] for i in indices} for b, indices in selected.items()},
        reset_count=attest.reset_count,
        restart_count=attest.restart_count,
        clock=attest.clock,
    )


def _describe(banks: Mapping[str, Iterable[int]]) -> str:
    return "; ".join(f"{b}: {_list(v)}" for b, v in banks.items()) or "none"


def _list(indices: Iterable[int]) -> str:
    return ",".join(str(i) for i in sorted(indices)) or "none"

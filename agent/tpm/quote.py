"""Quotes and the PCRs they cover: TPM2_Quote over PCRs 0-23 of every active bank the broker
verifies (sha1, sha256, sha384), PCR_Read, PCR_Extend.

A policy names its bank; the agent does not know which, so it quotes them all in one selection
(one signature) and sends every bank's values. A TPM with only sha1 active quotes sha1.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMU_HA,
)

from agent.blobs import AkBlobs, Quote
from agent.errors import TpmError
from agent.tpm.identity import EndorsementKey, loaded_ak
from agent.tpm.tss2 import command

__all__ = ["QUOTE_BANKS", "active_banks", "extend_pcr", "pcr_selection", "quote", "read_pcrs"]

log = logging.getLogger(__name__)

QUOTE_BANKS = ("sha1", "sha256", "sha384")  # what the broker verifies, in selection order
QUOTE_PCRS = tuple(range(24))
MAX_QUALIFYING_DATA = 64
PCR_READ_CHUNK = 8  # TPM2_PCR_Read returns at most 8 PCRs per call
QUOTE_ATTEMPTS = 3

_BANKS = ("sha1", "sha256", "sha384", "sha512")
_ALGS = {"sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384,
         "sha512": TPM2_ALG.SHA512}  # fmt: skip


def pcr_selection(bank: str, indices: Sequence[int]) -> Any:
    return TPML_PCR_SELECTION.parse(f"{bank}:{','.join(str(i) for i in indices)}")


def _banks_selection(banks: Sequence[str], indices: Sequence[int]) -> Any:
    pcrs = ",".join(str(i) for i in indices)
    return TPML_PCR_SELECTION.parse("+".join(f"{bank}:{pcrs}" for bank in banks))


def active_banks(esys: Any) -> tuple[str, ...]:
    """The quotable banks this TPM has allocated (PCRs 0-23 selected), in QUOTE_BANKS order."""
    with command("GetCapability (PCRS)"):
        _, data = esys.get_capability(TPM2_CAP.PCRS, 0, 1)
    allocated = set()
    for n in range(int(data.data.assignedPCR.count)):
        sel = data.data.assignedPCR.pcrSelections[n]
        if any(bytes(sel.pcrSelect)[: int(sel.sizeofSelect)]):
            allocated.add(int(sel.hash))
    found = tuple(b for b in QUOTE_BANKS if int(_ALGS[b]) in allocated)
    if not found:
        raise TpmError("the TPM has none of the PCR banks sha1, sha256, sha384 active")
    return found


def _selected(selection: Any) -> list[int]:
    """PCR indices of a one-bank TPML_PCR_SELECTION, in ascending order."""
    indices: list[int] = []
    for n in range(int(selection.count)):
        sel = selection.pcrSelections[n]
        bitmap = bytes(sel.pcrSelect)[: int(sel.sizeofSelect)]
        indices += [8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1]
    return sorted(indices)


def quote(esys: Any, ek: EndorsementKey, ak: AkBlobs, qualifying_data: bytes) -> Quote:
    """TPM2_Quote over PCRs 0-23 of every active bank (one selection) with the AK's own scheme,
    plus the PCR values.

    The values are read right after the quote and checked against the signed digest (SHA-256,
    the AK's scheme, over the banks in selection order); if a PCR moved in between, the quote is
    taken again.
    """
    if len(qualifying_data) > MAX_QUALIFYING_DATA:
        raise TpmError(f"qualifying data is {len(qualifying_data)} bytes; at most 64 fit")
    banks = active_banks(esys)
    with loaded_ak(esys, ek, ak) as ak_handle:
        for _ in range(QUOTE_ATTEMPTS):
            with command("Quote"):
                attest, signature = esys.quote(
                    ak_handle,
                    _banks_selection(banks, QUOTE_PCRS),
                    qualifying_data,
                    TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                    session1=ESYS_TR.PASSWORD,
                )
            values = {bank: read_pcrs(esys, bank, QUOTE_PCRS) for bank in banks}
            ordered = b"".join(values[bank][i] for bank in banks for i in QUOTE_PCRS)
            signed, _ = TPMS_ATTEST.unmarshal(bytes(attest))
            if bytes(signed.attested.quote.pcrDigest) == hashlib.sha256(ordered).digest():
                return Quote(
                    attest=attest.marshal(),
                    signature=signature.marshal(),
                    banks=values,
                    clock=int(signed.clockInfo.clock),
                )
            log.info("a PCR changed while quoting; quoting again")
    raise TpmError("PCRs kept changing while quoting; try again once boot has settled")


def read_pcrs(esys: Any, bank: str, indices: Sequence[int]) -> dict[int, bytes]:
    """PCR values of one bank, keyed by index."""
    if bank not in _BANKS:
        raise TpmError(f"unknown PCR bank {bank!r}; use one of {', '.join(_BANKS)}")
    wanted = sorted(set(indices))
    if any(not 0 <= i < 24 for i in wanted):
        raise TpmError(f"PCR indices must be 0-23, got {list(indices)}")
    values: dict[int, bytes] = {}
    pending = wanted
    while pending:
        with command("PCR_Read"):
            _, selection, digests = esys.pcr_read(pcr_selection(bank, pending[:PCR_READ_CHUNK]))
        got = _selected(selection)
        if not got:
            raise TpmError(f"the TPM has no active {bank} PCR bank (PCRs {pending})")
        for index, digest in zip(got, digests, strict=True):
            values[index] = bytes(digest)
        pending = [i for i in pending if i not in values]
    return values


def extend_pcr(esys: Any, index: int, data: bytes) -> None:
    """Extend PCR ``index`` of every active bank with that bank's hash of ``data``."""
    if not 0 <= index < 24:
        raise TpmError(f"PCR index must be 0-23, got {index}")
    digests = TPML_DIGEST_VALUES(
        [
            TPMT_HA(hashAlg=_ALGS[bank], digest=TPMU_HA(**{bank: hashlib.new(bank, data).digest()}))
            for bank in active_banks(esys)
        ]
    )
    with command("PCR_Extend"):
        esys.pcr_extend(ESYS_TR(ESYS_TR.PCR0 + index), digests, session1=ESYS_TR.PASSWORD)

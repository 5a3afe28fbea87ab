"""TPM structures: public areas, and quotes with their signatures through the quote verifier."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss import TPM2_ALG, TPMA_OBJECT

from kbs.quote import qualified_name, verify_quote
from kbs.tpm.objects import check_ak_attributes, parse_public
from keylease.api.v1 import qualifying_data
from scripts.fuzz_targets.common import (
    AK_ATTRIBUTES,
    EK_ATTRIBUTES,
    NONCE,
    ec_key,
    harness_ak,
    tpm_public,
)

REQUIRED_PCRS = frozenset({0, 7})


# --- TPM public areas --------------------------------------------------------------------------


def fuzz_tpm_public(data: bytes) -> None:
    check_ak_attributes(parse_public(data, "fuzzed public area"))


def public_seeds() -> Iterator[bytes]:
    yield tpm_public(ec_key(1), AK_ATTRIBUTES)
    yield tpm_public(ec_key(2), EK_ATTRIBUTES)
    yield tpm_public(ec_key(3, ec.SECP384R1()), AK_ATTRIBUTES)
    yield tpm_public(ec_key(4), AK_ATTRIBUTES & ~TPMA_OBJECT.RESTRICTED)


# --- quotes ------------------------------------------------------------------------------------
# Input: mode (1 byte), PCR count k (1 byte), k x (index byte, 32-byte value), then
#   mode 0 ("raw"): signature length (2 bytes), the TPMT_SIGNATURE, the TPM2B_ATTEST;
#   mode 1 ("signed"): a TPMS_ATTEST body, which the harness wraps and signs with its AK.


def fuzz_quote(data: bytes) -> None:
    ak_key, ak, ek = harness_ak()
    if len(data) < 2:
        return
    mode, count, pos = data[0] & 1, data[1] % 25, 2
    pcrs: dict[int, bytes] = {}
    for _ in range(count):
        if pos + 33 > len(data):
            return
        pcrs[data[pos]] = data[pos + 1 : pos + 33]
        pos += 33
    if mode == 0:
        size = int.from_bytes(data[pos : pos + 2], "big")
        signature, quote = data[pos + 2 : pos + 2 + size], data[pos + 2 + size :]
    else:
        body = data[pos:]
        quote = len(body).to_bytes(2, "big") + body
        signature = _sign(ak_key, body)
    verify_quote(
        ak,
        quote,
        signature,
        qualifying_data(NONCE),
        {"sha256": pcrs},
        required={"sha256": REQUIRED_PCRS},
        ek=ek,
    )


def _sign(key: ec.EllipticCurvePrivateKey, body: bytes) -> bytes:
    r, s = decode_dss_signature(
        key.sign(body, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    )
    rb, sb = r.to_bytes(32, "big"), s.to_bytes(32, "big")
    return (
        struct.pack(">HHH", TPM2_ALG.ECDSA, TPM2_ALG.SHA256, 32) + rb + struct.pack(">H", 32) + sb
    )


def _attest_body(pcrs: dict[int, bytes], signer: bytes, extra: bytes) -> bytes:
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    digest = hashlib.sha256(b"".join(pcrs[i] for i in sorted(pcrs))).digest()
    return (
        struct.pack(">IH", 0xFF544347, 0x8018)
        + struct.pack(">H", len(signer)) + signer
        + struct.pack(">H", len(extra)) + extra
        + struct.pack(">QIIB", 123456, 3, 1, 1) + bytes(8)
        + struct.pack(">IHB", 1, TPM2_ALG.SHA256, 3) + bytes(bitmap)
        + struct.pack(">H", len(digest)) + digest
    )  # fmt: skip


def _quote_input(mode: int, pcrs: dict[int, bytes], rest: bytes) -> bytes:
    head = bytes([mode, len(pcrs)]) + b"".join(bytes([i]) + v for i, v in sorted(pcrs.items()))
    return head + rest


def quote_seeds() -> Iterator[bytes]:
    ak_key, ak, ek = harness_ak()
    pcrs = {i: hashlib.sha256(bytes([i])).digest() for i in range(8)}
    good = _attest_body(pcrs, qualified_name(ek, ak), qualifying_data(NONCE))
    yield _quote_input(1, pcrs, good)
    yield _quote_input(1, {0: pcrs[0], 7: pcrs[7]}, good)
    yield _quote_input(1, pcrs, _attest_body(pcrs, qualified_name(ek, ak), b"other nonce"))
    signed = len(good).to_bytes(2, "big") + good
    signature = _sign(ak_key, good)
    yield _quote_input(0, pcrs, len(signature).to_bytes(2, "big") + signature + signed)

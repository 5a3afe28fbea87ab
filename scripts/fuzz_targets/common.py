"""What the fuzz targets share: the scratch directory, fixed inputs, and keys made from fixed
numbers, so that seeds and corpus entries from earlier runs stay valid."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_ECC_SCHEME

from kbs.tpm.objects import TpmPublic, parse_public

SCRATCH_ENV = "KEYLEASE_FUZZ_SCRATCH"
ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 6, 1, tzinfo=UTC)
NONCE = bytes(range(32))
NODE = "fuzz-node"


@cache
def work() -> Path:
    """A scratch directory for the targets that read files: ``$KEYLEASE_FUZZ_SCRATCH`` (which
    ``scripts.fuzz`` makes on tmpfs and removes), else a new one on tmpfs."""
    given = os.environ.get(SCRATCH_ENV)
    return Path(given) if given else Path(tempfile.mkdtemp(prefix="keylease-fuzz-", dir="/dev/shm"))


@dataclass(frozen=True)
class Target:
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]  # what the parser may raise: its package's errors
    seeds: Callable[[], Iterator[bytes]]
    modules: tuple[str, ...]  # the code under test (line coverage is reported for these)
    max_len: int = 4096


def ec_key(n: int, curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(0x6B65796C65617365 + n, curve or ec.SECP256R1())


def tpm_public(key: ec.EllipticCurvePrivateKey, attributes: int) -> bytes:
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = TPM2B_PUBLIC.from_pem(pem, objectAttributes=attributes)
    if attributes & TPMA_OBJECT.SIGN_ENCRYPT:
        public.publicArea.parameters.eccDetail.scheme = TPMT_ECC_SCHEME(
            scheme=TPM2_ALG.ECDSA, details={"ecdsa": {"hashAlg": TPM2_ALG.SHA256}}
        )
    else:
        public.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.AES
        public.publicArea.parameters.eccDetail.symmetric.keyBits.aes = 128
        public.publicArea.parameters.eccDetail.symmetric.mode.aes = TPM2_ALG.CFB
    return bytes(public.marshal())


AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
)  # fmt: skip
EK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.ADMINWITHPOLICY
)  # fmt: skip


@cache
def harness_ak() -> tuple[ec.EllipticCurvePrivateKey, TpmPublic, TpmPublic]:
    """The harness's AK (with its private key, to sign fuzzed attestations) and EK."""
    ak_key, ek_key = ec_key(1), ec_key(2)
    ak = parse_public(tpm_public(ak_key, AK_ATTRIBUTES), "AK")
    ek = parse_public(tpm_public(ek_key, EK_ATTRIBUTES), "EK")
    return ak_key, ak, ek

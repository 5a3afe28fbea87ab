"""TPM public areas received from nodes, parsed once at the edge (no TPM needed).

``parse_public`` turns a marshalled TPM2B_PUBLIC into a ``TpmPublic`` (the parsed area, a
``cryptography`` key and the TPM name computed here, never taken from the node), refusing
anything malformed with ``InvalidRequest``. ``check_ak_attributes`` refuses an AK that is not a
restricted signing key created inside the TPM.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss import TPM2_ALG, TPM2_ECC, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC, TSS2_Exception

from kbs.errors import AkAttributesInvalid, InvalidRequest

__all__ = ["TpmPublic", "check_ak_attributes", "parse_public"]

MAX_PUBLIC = 4096  # a TPM2B_PUBLIC is far smaller; refuse huge inputs before parsing
CACHE_ENTRIES = 32768  # two per node (EK and AK); ~2 KiB each

_NAME_ALGS = {
    TPM2_ALG.SHA256: hashlib.sha256,
    TPM2_ALG.SHA384: hashlib.sha384,
    TPM2_ALG.SHA512: hashlib.sha512,
}
_CURVES: dict[int, tuple[ec.EllipticCurve, int]] = {
    TPM2_ECC.NIST_P256: (ec.SECP256R1(), 32),
    TPM2_ECC.NIST_P384: (ec.SECP384R1(), 48),
    TPM2_ECC.NIST_P521: (ec.SECP521R1(), 66),
}
_RSA_BITS = (2048, 3072, 4096)

_Invalid = Callable[[str], Exception]


@dataclass(frozen=True)
class TpmPublic:
    raw: bytes  # the TPM2B_PUBLIC bytes as received
    area: TPMT_PUBLIC  # the parsed public area (tpm2_pytss)
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    name: bytes  # nameAlg (2 bytes BE) || H_nameAlg(marshalled TPMT_PUBLIC)
    attributes: int  # objectAttributes


def parse_public(data: bytes, what: str) -> TpmPublic:
    """Parse a marshalled TPM2B_PUBLIC holding an RSA or ECC key; raise InvalidRequest otherwise.

    Results are cached by the exact bytes (``CACHE_ENTRIES``, least recently used out): the
    broker parses each node's enrolled EK and AK on every attestation, and a parse costs about
    0.13 ms. A ``TpmPublic`` is immutable by contract: callers never modify ``area``.
    """
    if len(data) > MAX_PUBLIC:  # never put huge inputs in the cache
        raise InvalidRequest(f"{what} is not a valid TPM2B_PUBLIC: {len(data)} bytes is too large")
    parsed = _parse_cached(bytes(data))
    if isinstance(parsed, str):
        raise InvalidRequest(f"{what} is not a valid TPM2B_PUBLIC: {parsed}")
    return parsed


@functools.lru_cache(maxsize=CACHE_ENTRIES)
def _parse_cached(data: bytes) -> TpmPublic | str:
    """The parsed public area, or why it is refused (deterministic, so cached too)."""
    try:
        return _parse(data)
    except _Refused as exc:
        return str(exc)


class _Refused(Exception):
    """Internal: why a public area is refused (``parse_public`` adds what it is)."""


def _parse(data: bytes) -> TpmPublic:
    def invalid(reason: str) -> _Refused:
        return _Refused(reason)

    if not data:
        raise invalid("it is empty")
    if len(data) > MAX_PUBLIC:
        raise invalid(f"{len(data)} bytes is too large")
    body = data[2:]
    try:
        public, used = TPM2B_PUBLIC.unmarshal(data)
        area = public.publicArea
        canonical = bytes(area.marshal()) == body
    except (TSS2_Exception, ValueError, TypeError) as exc:
        raise invalid(f"truncated or garbage ({exc})") from None
    if used != len(data):
        raise invalid(f"{len(data) - used} trailing byte(s)")
    if int.from_bytes(data[:2], "big") != len(body) or not canonical:
        raise invalid("the size field or encoding is not canonical")
    name_hash = _NAME_ALGS.get(area.nameAlg)
    if name_hash is None:
        raise invalid(f"unsupported nameAlg {_alg(area.nameAlg)} (use sha256)")
    if area.type == TPM2_ALG.RSA:
        key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = _rsa_key(area, invalid)
    elif area.type == TPM2_ALG.ECC:
        key = _ecc_key(area, invalid)
    else:
        raise invalid(f"unsupported key type {_alg(area.type)} (only RSA and ECC keys)")
    name = int(area.nameAlg).to_bytes(2, "big") + name_hash(body).digest()
    return TpmPublic(
        raw=bytes(data), area=area, key=key, name=name, attributes=int(area.objectAttributes)
    )


def _alg(value: object) -> str:
    """An algorithm id for a message: its TCG name when known ("sha256"), else its number."""
    return str(value)


def _rsa_key(area: TPMT_PUBLIC, invalid: _Invalid) -> rsa.RSAPublicKey:
    bits = int(area.parameters.rsaDetail.keyBits)
    if bits not in _RSA_BITS:
        raise invalid(f"unsupported RSA key size {bits} (2048, 3072 or 4096)")
    modulus = bytes(area.unique.rsa)
    if len(modulus) != bits // 8:
        raise invalid(f"RSA modulus is {len(modulus)} bytes for a {bits}-bit key")
    exponent = int(area.parameters.rsaDetail.exponent) or 65537
    try:
        return rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
    except ValueError as exc:
        raise invalid(f"RSA public key is invalid ({exc})") from None


def _ecc_key(area: TPMT_PUBLIC, invalid: _Invalid) -> ec.EllipticCurvePublicKey:
    curve_id = int(area.parameters.eccDetail.curveID)
    if curve_id not in _CURVES:
        raise invalid(f"unsupported ECC curve 0x{curve_id:04x} (NIST P-256, P-384 or P-521)")
    curve, size = _CURVES[curve_id]
    x, y = bytes(area.unique.ecc.x), bytes(area.unique.ecc.y)
    if len(x) != size or len(y) != size:
        raise invalid(f"ECC point coordinates must be {size} bytes each")
    numbers = ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
    )
    try:
        return numbers.public_key()
    except ValueError as exc:
        raise invalid(f"ECC point is not on the curve ({exc})") from None


_REQUIRED = (
    (TPMA_OBJECT.RESTRICTED, "AK must be restricted"),
    (TPMA_OBJECT.SIGN_ENCRYPT, "AK must be a signing key (sign)"),
    (TPMA_OBJECT.FIXEDTPM, "AK must be fixedTPM"),
    (TPMA_OBJECT.FIXEDPARENT, "AK must be fixedParent"),
    (TPMA_OBJECT.SENSITIVEDATAORIGIN, "AK must be sensitiveDataOrigin (created inside the TPM)"),
)


def check_ak_attributes(ak: TpmPublic) -> None:
    """Refuse an AK that is not a restricted, fixedTPM/fixedParent signing key made in the TPM.

    Raises AkAttributesInvalid naming every problem found.
    """
    area = ak.area
    problems = [text for flag, text in _REQUIRED if not ak.attributes & flag]
    if ak.attributes & TPMA_OBJECT.DECRYPT:
        problems.append("AK must not be a decrypt key")
    if area.nameAlg != TPM2_ALG.SHA256:
        problems.append(f"AK nameAlg must be sha256, not {_alg(area.nameAlg)}")
    if isinstance(ak.key, ec.EllipticCurvePublicKey):
        if not isinstance(ak.key.curve, ec.SECP256R1):
            problems.append(f"an ECC AK must use NIST P-256, not {ak.key.curve.name}")
        scheme = area.parameters.eccDetail.scheme
        if scheme.scheme != TPM2_ALG.ECDSA or scheme.details.ecdsa.hashAlg != TPM2_ALG.SHA256:
            problems.append("an ECC AK must sign with ECDSA-SHA256")
    else:
        if ak.key.key_size < 2048:
            problems.append(f"an RSA AK must have at least 2048 bits, not {ak.key.key_size}")
        scheme = area.parameters.rsaDetail.scheme
        if (
            scheme.scheme not in (TPM2_ALG.RSASSA, TPM2_ALG.RSAPSS)
            or scheme.details.anySig.hashAlg != TPM2_ALG.SHA256
        ):
            problems.append("an RSA AK must sign with RSASSA-SHA256 or RSAPSS-SHA256")
    if problems:
        raise AkAttributesInvalid(
            "AK refused: "
            + "; ".join(problems)
            + ". Let keylease-agent create the AK (delete its ak.pub/ak.priv and run it again)"
        )

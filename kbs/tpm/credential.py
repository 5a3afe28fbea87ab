"""Credential activation challenges and outer wrappers to an EK, in software (no TPM needed).

``make_credential`` is TPM2_MakeCredential: the broker encrypts a fresh secret to the node's EK,
bound to the AK's name; only the TPM that holds both the EK and an object with that name can
recover it with TPM2_ActivateCredential. ``outer_wrap`` is the shared primitive (TPM 2.0 Part 1,
sections 23.3 and 24): a seed encrypted to the EK (RSA-OAEP or ECDH + KDFe), KDFa-derived AES-CFB
and HMAC keys, an outer HMAC over the ciphertext and the object's name. It is computed here with
``cryptography``, ``hmac`` and ``struct`` (about 0.15 ms) rather than through tpm2-pytss's
``utils.make_credential``/``utils.wrap`` (0.6-0.8 ms through the TSS types); the bytes are the same.
"""

from __future__ import annotations

import functools
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from tpm2_pytss import TPM2_ALG, TPMA_OBJECT

from kbs.errors import InvalidRequest
from kbs.tpm.objects import TpmPublic, parse_public
from keylease.secret import Secret

__all__ = [
    "CHALLENGE_SECRET_BYTES",
    "StorageParent",
    "check_storage_key",
    "make_credential",
    "new_challenge_secret",
    "outer_wrap",
    "storage_parent",
]

CHALLENGE_SECRET_BYTES = 32
_IDENTITY = b"IDENTITY\x00"
_Hash = type[hashes.SHA256] | type[hashes.SHA384] | type[hashes.SHA512]
_HASHES: dict[int, _Hash] = {
    int(TPM2_ALG.SHA256): hashes.SHA256,
    int(TPM2_ALG.SHA384): hashes.SHA384,
    int(TPM2_ALG.SHA512): hashes.SHA512,
}


def new_challenge_secret() -> Secret:
    """32 random bytes for one enrollment challenge."""
    return Secret(os.urandom(CHALLENGE_SECRET_BYTES))


def check_storage_key(ek: TpmPublic, what: str = "the EK") -> None:
    """Refuse a key that cannot be a parent for MakeCredential/Import (restricted decrypt)."""
    restricted_decrypt = TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
    if ek.attributes & restricted_decrypt != restricted_decrypt or ek.attributes & (
        TPMA_OBJECT.SIGN_ENCRYPT
    ):
        raise InvalidRequest(f"{what} is not a restricted decryption (storage) key")
    if ek.area.parameters.asymDetail.symmetric.algorithm == TPM2_ALG.NULL:
        raise InvalidRequest(f"{what} has no symmetric algorithm; it cannot be a parent")


@dataclass(frozen=True)
class StorageParent:
    """What an outer wrapper to a storage key (an EK) needs from its public area."""

    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    hash: _Hash  # the parent's nameAlg
    digest: str  # the same, as a hashlib name
    sym_bytes: int  # AES key size of the parent's symmetric scheme (CFB)
    ecc_x: bytes  # an ECC parent's public x coordinate (KDFe's partyVInfo); b"" for RSA


def storage_parent(ek: TpmPublic) -> StorageParent:
    """The EK as a wrapping parent (cached per EK); InvalidRequest if it cannot be one."""
    parent = _storage_parent(ek.raw)
    if isinstance(parent, str):
        raise InvalidRequest(parent)
    return parent


@functools.lru_cache(maxsize=32768)
def _storage_parent(raw: bytes) -> StorageParent | str:
    try:
        ek = parse_public(raw, "the EK")
        check_storage_key(ek)
    except InvalidRequest as exc:
        return str(exc)
    sym = ek.area.parameters.asymDetail.symmetric
    if sym.algorithm != TPM2_ALG.AES or sym.mode.sym != TPM2_ALG.CFB:
        return "the EK's symmetric scheme is not AES-CFB; it cannot be a parent"
    name_hash = _HASHES.get(int(ek.area.nameAlg))
    if name_hash is None:
        return "the EK's nameAlg is not sha256, sha384 or sha512"
    ecc_x = b""
    if isinstance(ek.key, ec.EllipticCurvePublicKey):
        ecc_x = ek.key.public_numbers().x.to_bytes((ek.key.curve.key_size + 7) // 8, "big")
    return StorageParent(ek.key, name_hash, name_hash.name, int(sym.keyBits.sym) // 8, ecc_x)


def _kdfa(digest: str, key: bytes, label: bytes, context: bytes, n: int) -> bytes:
    """TPM KDFa (SP 800-108 counter mode, HMAC), ``n`` bytes; ``label`` without its NUL."""
    out = b""
    counter = 1
    fixed = label + b"\x00" + context + struct.pack(">I", n * 8)
    while len(out) < n:
        out += hmac.new(key, struct.pack(">I", counter) + fixed, digest).digest()
        counter += 1
    return out[:n]


def _seed(parent: StorageParent, label: bytes) -> tuple[bytes, bytes]:
    """(seed, the encrypted seed as TPM2B_ENCRYPTED_SECRET's buffer); ``label`` ends in NUL."""
    size = parent.hash.digest_size
    if isinstance(parent.key, rsa.RSAPublicKey):
        seed = os.urandom(size)
        oaep = padding.OAEP(padding.MGF1(parent.hash()), parent.hash(), label)
        return seed, parent.key.encrypt(seed, oaep)
    curve = parent.key.curve
    length = (curve.key_size + 7) // 8
    ephemeral = ec.generate_private_key(curve)
    point = ephemeral.public_key().public_numbers()
    ex, ey = point.x.to_bytes(length, "big"), point.y.to_bytes(length, "big")
    z = ephemeral.exchange(ec.ECDH(), parent.key)
    seed = ConcatKDFHash(parent.hash(), size, label + ex + parent.ecc_x).derive(z)
    return seed, _tpm2b(ex) + _tpm2b(ey)


def outer_wrap(ek: TpmPublic, label: bytes, name: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """Encrypt and integrity-protect ``plaintext`` to ``ek`` for the object named ``name``.

    ``label``: b"DUPLICATE\\0" (TPM2_Import) or b"IDENTITY\\0" (TPM2_ActivateCredential).
    Returns (TPM2B(TPM2B(outer HMAC) || ciphertext), TPM2B_ENCRYPTED_SECRET), marshalled.
    """
    parent = storage_parent(ek)
    seed, encrypted_seed = _seed(parent, label)
    sym_key = _kdfa(parent.digest, seed, b"STORAGE", name, parent.sym_bytes)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    hmac_key = _kdfa(parent.digest, seed, b"INTEGRITY", b"", parent.hash.digest_size)
    outer = hmac.new(hmac_key, ciphertext + name, parent.digest).digest()
    return _tpm2b(_tpm2b(outer) + ciphertext), _tpm2b(encrypted_seed)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def make_credential(ek: TpmPublic, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """Encrypt ``secret`` to ``ek`` for the object named ``ak_name``.

    Returns (marshalled TPM2B_ID_OBJECT, marshalled TPM2B_ENCRYPTED_SECRET).
    """
    check_storage_key(ek)
    name_alg = int.from_bytes(ak_name[:2], "big")
    if len(ak_name) < 2 or _digest_size(name_alg) != len(ak_name) - 2:
        raise InvalidRequest("the AK name is not nameAlg || digest")
    limit = _digest_size(int(ek.area.nameAlg))
    if not 0 < len(secret) <= limit:
        raise InvalidRequest(f"a credential secret for this EK must be 1 to {limit} bytes")
    return outer_wrap(ek, _IDENTITY, ak_name, _tpm2b(secret))


def _digest_size(alg: int) -> int:
    found = _HASHES.get(alg)
    return found.digest_size if found else 0

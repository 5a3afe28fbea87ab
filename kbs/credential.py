"""Credential activation challenges (TPM2_MakeCredential in software, no TPM needed).

The broker encrypts a fresh secret to the node's EK, bound to the AK's name: only the TPM that
holds both the EK and an object with that name can recover it with TPM2_ActivateCredential.
"""

from __future__ import annotations

import os

from tpm2_pytss import TPM2_ALG, TPMA_OBJECT, TSS2_Exception
from tpm2_pytss.utils import make_credential as _tss_make_credential

from kbs.api.secret import Secret
from kbs.errors import InvalidRequest
from kbs.tpm_objects import TpmPublic

__all__ = ["CHALLENGE_SECRET_BYTES", "check_storage_key", "make_credential", "new_challenge_secret"]

CHALLENGE_SECRET_BYTES = 32
_DIGEST_SIZES = {int(TPM2_ALG.SHA256): 32, int(TPM2_ALG.SHA384): 48, int(TPM2_ALG.SHA512): 64}


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


def make_credential(ek: TpmPublic, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """Encrypt ``secret`` to ``ek`` for the object named ``ak_name``.

    Returns (marshalled TPM2B_ID_OBJECT, marshalled TPM2B_ENCRYPTED_SECRET).
    """
    check_storage_key(ek)
    name_alg = int.from_bytes(ak_name[:2], "big")
    if len(ak_name) < 2 or _DIGEST_SIZES.get(name_alg) != len(ak_name) - 2:
        raise InvalidRequest("the AK name is not nameAlg || digest")
    limit = _DIGEST_SIZES.get(int(ek.area.nameAlg), 0)
    if not 0 < len(secret) <= limit:
        raise InvalidRequest(f"a credential secret for this EK must be 1 to {limit} bytes")
    try:
        blob, encrypted_secret = _tss_make_credential(ek.area, secret, ak_name)
    except (TSS2_Exception, ValueError) as exc:
        raise InvalidRequest(f"cannot make a credential for this EK: {exc}") from None
    return blob.marshal(), encrypted_secret.marshal()

"""The master key: AES-256-GCM encryption of every image key stored in the database.

Blob format (version 1): ``0x01 || nonce (12 bytes) || ciphertext || tag (16 bytes)``. The
associated data is ``0x01 || aad``; callers bind each blob to its key name and version with
``key_aad`` so that a row copied onto another key's row does not decrypt.
"""

from __future__ import annotations

import os
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kbs.api.secret import Secret
from kbs.errors import ConfigError, StoreError

__all__ = ["MASTER_KEY_BYTES", "MasterKey", "key_aad", "new_master_key"]

MASTER_KEY_BYTES = 32
_FORMAT_V1 = b"\x01"
_NONCE_BYTES = 12
_TAG_BYTES = 16


def key_aad(name: str, version: int) -> bytes:
    """AAD binding stored key material to its key name and version."""
    return f"keylease key {name} v{version}".encode()


def new_master_key() -> Secret:
    """32 fresh random bytes for ``keylease-kbs init``."""
    return Secret(os.urandom(MASTER_KEY_BYTES))


class MasterKey:
    """Seals and opens stored key material. ``repr`` never shows the key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise ConfigError(
                f"the master key must be exactly {MASTER_KEY_BYTES} bytes, got {len(key)}"
            )
        self._key = Secret(key)

    def seal(self, plaintext: Secret, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = AESGCM(self._key.reveal()).encrypt(nonce, plaintext.reveal(), _FORMAT_V1 + aad)
        return _FORMAT_V1 + nonce + ciphertext

    def open(self, blob: bytes, aad: bytes) -> Secret:
        """Decrypt a sealed blob; raises StoreError if it is malformed, tampered or foreign."""
        if len(blob) < 1 + _NONCE_BYTES + _TAG_BYTES or blob[:1] != _FORMAT_V1:
            raise StoreError(
                "stored key material is malformed (unknown format or truncated): the database "
                "was damaged or written by another program"
            )
        nonce = blob[1 : 1 + _NONCE_BYTES]
        try:
            plaintext = AESGCM(self._key.reveal()).decrypt(
                nonce, blob[1 + _NONCE_BYTES :], _FORMAT_V1 + aad
            )
        except InvalidTag:
            raise StoreError(
                "stored key material does not decrypt with master.key: wrong master key or "
                "tampered database"
            ) from None
        return Secret(plaintext)

    def __repr__(self) -> str:
        return "MasterKey(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("MasterKey cannot be pickled")

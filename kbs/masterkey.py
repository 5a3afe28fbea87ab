"""The master key: AES-256-GCM encryption of every image key stored in the database, and the
files it is read from.

Blob formats:

- keyed (tag byte ``0x11``, written now): ``0x11 || key id (8 bytes) || nonce (12) || ciphertext
  || tag (16)``, associated data ``0x11 || key id || aad``. The key id (``key_id``) names the
  master key that sealed the blob, so a broker holding several keys (``master_key`` plus
  ``previous_master_keys`` during a rotation) opens each blob with the right one.
- version 1 (tag byte ``0x01``, read only): ``0x01 || nonce || ciphertext || tag``, associated
  data ``0x01 || aad``; written before key ids existed, tried with every key held.

Callers bind each blob to its key name and version with ``key_aad`` so that a row copied onto
another key's row does not decrypt. ``MasterKey`` seals with its current key and opens with any
key it holds; given a ``reload`` callable it asks for the configured keys again when it meets a
key id it does not hold (another process rotated the master key), at most once a second.

``read_master_key`` reads one key file, refusing one other users can read (with the chmod fix);
``master_keyring`` is ``master_key`` plus ``previous_master_keys`` as the broker uses them, for
``serve`` and ``check-config`` alike.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kbs.config import KbsConfig, load_config
from kbs.errors import ConfigError, StoreError
from keylease.secret import Secret

__all__ = [
    "MASTER_KEY_BYTES",
    "MasterKey",
    "blob_key_id",
    "key_aad",
    "key_id",
    "master_keyring",
    "new_master_key",
    "read_master_key",
]

MASTER_KEY_BYTES = 32
KEY_ID_BYTES = 8
_FORMAT_V1 = b"\x01"
_FORMAT_KEYED = b"\x11"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_RELOAD_INTERVAL = 1.0
_WRONG_KEY = (
    "stored key material does not decrypt with master.key: wrong master key or tampered database"
)

Reload = Callable[[], tuple[bytes, Sequence[bytes]]]


def key_aad(name: str, version: int) -> bytes:
    """AAD binding stored key material to its key name and version."""
    return f"keylease key {name} v{version}".encode()


def new_master_key() -> Secret:
    """32 fresh random bytes for ``keylease-kbs init`` and ``master-key rotate --generate``."""
    return Secret(os.urandom(MASTER_KEY_BYTES))


def key_id(key: bytes) -> str:
    """The public identifier of a master key (16 hex digits); reveals nothing about the key."""
    return hashlib.sha256(b"keylease master key id\x00" + key).digest()[:KEY_ID_BYTES].hex()


def blob_key_id(blob: bytes) -> str | None:
    """The key id a keyed blob names; None for a version-1 blob (sealed before key ids)."""
    if blob[:1] == _FORMAT_KEYED and len(blob) > 1 + KEY_ID_BYTES:
        return blob[1 : 1 + KEY_ID_BYTES].hex()
    return None


def _check(key: bytes) -> Secret:
    if len(key) != MASTER_KEY_BYTES:
        raise ConfigError(
            f"the master key must be exactly {MASTER_KEY_BYTES} bytes, got {len(key)}"
        )
    return Secret(key)


class MasterKey:
    """Seals with the current key, opens with any key held. ``repr`` never shows a key."""

    __slots__ = ("_current", "_keys", "_last_reload", "_lock", "_reload")

    def __init__(
        self, key: bytes, previous: Sequence[bytes] = (), reload: Reload | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._reload = reload
        self._last_reload = 0.0
        self._current, self._keys = self._ring(key, previous)

    @staticmethod
    def _ring(key: bytes, previous: Sequence[bytes]) -> tuple[str, dict[str, Secret]]:
        keys = {key_id(key): _check(key)}
        for old in previous:
            keys.setdefault(key_id(old), _check(old))
        return key_id(key), keys

    @property
    def current_id(self) -> str:
        return self._current

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of every key held, the current one first."""
        with self._lock:
            return (self._current, *(k for k in self._keys if k != self._current))

    def seal(self, plaintext: Secret, aad: bytes) -> bytes:
        with self._lock:
            kid, key = bytes.fromhex(self._current), self._keys[self._current]
        nonce = os.urandom(_NONCE_BYTES)
        header = _FORMAT_KEYED + kid
        return (
            header + nonce + AESGCM(key.reveal()).encrypt(nonce, plaintext.reveal(), header + aad)
        )

    def open(self, blob: bytes, aad: bytes) -> Secret:
        """Decrypt a sealed blob; raises StoreError if it is malformed, tampered or sealed under
        a master key this broker does not hold."""
        if blob[:1] == _FORMAT_KEYED and len(blob) >= 1 + KEY_ID_BYTES + _NONCE_BYTES + _TAG_BYTES:
            kid = blob[1 : 1 + KEY_ID_BYTES].hex()
            key = self._lookup(kid)
            if key is None:
                raise StoreError(
                    f"{_WRONG_KEY}: it is sealed under master key {kid}, which this broker does "
                    "not hold; add that key's file to `previous_master_keys` in kbs.toml"
                )
            header = blob[: 1 + KEY_ID_BYTES]
            body = blob[1 + KEY_ID_BYTES :]
            return _decrypt(key, body, header + aad)
        if blob[:1] == _FORMAT_V1 and len(blob) >= 1 + _NONCE_BYTES + _TAG_BYTES:
            with self._lock:
                keys = list(self._keys.values())
            for key in keys:
                try:
                    return _decrypt(key, blob[1:], _FORMAT_V1 + aad)
                except StoreError:
                    continue
            raise StoreError(_WRONG_KEY)
        raise StoreError(
            "stored key material is malformed (unknown format or truncated): the database "
            "was damaged or written by another program"
        )

    def _lookup(self, kid: str) -> Secret | None:
        with self._lock:
            if kid in self._keys or self._reload is None:
                return self._keys.get(kid)
            if time.monotonic() - self._last_reload < _RELOAD_INTERVAL:
                return None
            self._last_reload = time.monotonic()
            try:
                current, previous = self._reload()
                self._current, self._keys = self._ring(current, previous)
            except ConfigError:
                return None
            return self._keys.get(kid)

    def __repr__(self) -> str:
        return "MasterKey(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("MasterKey cannot be pickled")


def _decrypt(key: Secret, body: bytes, aad: bytes) -> Secret:
    nonce = body[:_NONCE_BYTES]
    try:
        return Secret(AESGCM(key.reveal()).decrypt(nonce, body[_NONCE_BYTES:], aad))
    except InvalidTag:
        raise StoreError(_WRONG_KEY) from None


def read_master_key(cfg: KbsConfig, path: Path | None = None) -> Secret:
    """The 32-byte master key (or the one at ``path``); refuses a file that other users can read
    (with the chmod fix)."""
    path = cfg.master_key if path is None else path
    try:
        with path.open("rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            data = f.read(MASTER_KEY_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"master_key {path} does not exist; `keylease-kbs init` creates it. Without the "
            "original file the stored image keys cannot be decrypted"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read master_key {path}: {exc.strerror}") from None
    if mode not in (0o600, 0o400):
        raise ConfigError(
            f"master_key {path} has mode {mode:04o}; it must be 0600 or 0400 (readable only by "
            f"the broker's user): run `chmod 600 {path}`"
        )
    if len(data) != MASTER_KEY_BYTES:
        size = f"{len(data)} bytes" if len(data) <= MASTER_KEY_BYTES else "longer"
        raise ConfigError(
            f"master_key {path} is {size}; it must be exactly {MASTER_KEY_BYTES} raw random "
            "bytes (the file `keylease-kbs init` wrote; a new key cannot decrypt stored keys)"
        )
    return Secret(data)


def master_keyring(cfg: KbsConfig) -> MasterKey:
    """``master_key`` plus ``previous_master_keys``; when it meets a blob sealed under a key it
    does not hold (a rotation by another process), it re-reads the config file's keys."""

    def keys(config: KbsConfig) -> tuple[bytes, list[bytes]]:
        current = read_master_key(config).reveal()
        return current, [read_master_key(config, p).reveal() for p in config.previous_master_keys]

    current, previous = keys(cfg)
    return MasterKey(current, previous, reload=lambda: keys(load_config(cfg.path)))

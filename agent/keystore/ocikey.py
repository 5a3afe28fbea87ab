"""Checking a released private key the way ocicrypt will parse it, before it is installed.

CRI-O and containerd's ctd-decoder parse every file in their key directory on every encrypted pull;
one file they cannot parse breaks pulls (on CRI-O, all pulls). So a key is installed only if it is
exactly one unencrypted PKCS#8 PEM block holding RSA >= 2048 or EC P-256/P-384/P-521, and its name
is safe as a file name. SEC1 (``EC PRIVATE KEY``), PKCS#1 (``RSA PRIVATE KEY``) and encrypted
PKCS#8 are refused: ocicrypt rejects the first and last, and the installer writes only PKCS#8.
"""

from __future__ import annotations

import binascii
import re

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent.errors import InvalidKey
from keylease.secret import Secret

__all__ = [
    "KEY_NAME",
    "MIN_RSA_BITS",
    "check_pem_shape",
    "validate_key_name",
    "validate_private_key_pem",
]

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MIN_RSA_BITS = 2048
MAX_PEM_BYTES = 64 * 1024

_BEGIN = b"-----BEGIN PRIVATE KEY-----"
_END = b"-----END PRIVATE KEY-----"
_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/=]+")
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_FIX = "re-import it as unencrypted PKCS#8 PEM (openssl pkcs8 -topk8 -nocrypt)"


def _shown(name: str) -> str:
    """The name as it may appear in a message: quoted, bounded, control characters escaped."""
    return repr(name[:80] + ("..." if len(name) > 80 else ""))


def validate_key_name(name: str) -> None:
    """Raise InvalidKey unless ``name`` is usable in a file name (``<name>.v<N>.pem``)."""
    if not KEY_NAME.fullmatch(name):
        raise InvalidKey(
            f"key name {_shown(name)} is not allowed: it becomes a file name and must be 1-63 "
            "characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def _pem_body(name: str, data: bytes) -> bytes:
    """Check the framing: one PKCS#8 block, only whitespace around it, plain base64 inside."""
    shown = _shown(name)
    if len(data) > MAX_PEM_BYTES:
        raise InvalidKey(f"key {shown} is larger than {MAX_PEM_BYTES} bytes; refusing it")
    if data.count(b"-----BEGIN ") != 1 or data.count(b"-----END ") != 1:
        raise InvalidKey(f"key {shown} must be exactly one PEM block; {_FIX}")
    start = data.find(_BEGIN)
    end = data.find(_END)
    if start < 0 or end < start:
        raise InvalidKey(
            f"key {shown} is not an unencrypted PKCS#8 PEM block ('-----BEGIN PRIVATE KEY-----'); "
            f"SEC1, PKCS#1 and encrypted keys are refused; {_FIX}"
        )
    lead, tail = data[:start], data[end + len(_END) :]
    # Go's pem.Decode finds "-----BEGIN" only at the start of the data or of a line.
    if lead.strip() or (lead and not lead.endswith(b"\n")) or tail.strip():
        raise InvalidKey(f"key {shown} has data outside its PEM block; {_FIX}")
    lines = data[start + len(_BEGIN) : end].split(b"\n")
    body = [line.strip(b"\r \t") for line in lines]
    if any(line and not _BASE64_LINE.fullmatch(line) for line in body):
        raise InvalidKey(f"key {shown} has PEM headers or non-base64 content; {_FIX}")
    try:
        der = binascii.a2b_base64(b"".join(body), strict_mode=True)
    except binascii.Error:
        raise InvalidKey(f"key {shown} is not valid base64 inside its PEM block; {_FIX}") from None
    if not der:
        raise InvalidKey(f"key {shown} is an empty PEM block")
    return data[start : end + len(_END)] + b"\n"


def check_pem_shape(name: str, pem: Secret) -> bytes:
    """The cheap half of the check: a safe file name and exactly one well-formed, unencrypted
    PKCS#8 PEM block (no key parsing). Returns the block. Raises InvalidKey."""
    validate_key_name(name)
    return _pem_body(name, pem.reveal())


def validate_private_key_pem(name: str, pem: Secret) -> None:
    """Raise InvalidKey unless ``pem`` is a key ocicrypt accepts and ``name`` a safe file name.

    Messages name the key and never include key bytes.
    """
    block = check_pem_shape(name, pem)
    shown = _shown(name)
    try:
        key = load_pem_private_key(block, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidKey(f"key {shown} does not parse as a PKCS#8 private key; {_FIX}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidKey(
                f"key {shown} is RSA-{key.key_size}; at least RSA-{MIN_RSA_BITS} is required"
            )
        return
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, _CURVES):
            raise InvalidKey(f"key {shown} is on curve {key.curve.name}; use P-256, P-384 or P-521")
        return
    raise InvalidKey(
        f"key {shown} is a {type(key).__name__.removeprefix('_')}; ocicrypt (JWE) decrypts only "
        "with RSA or EC P-256/P-384/P-521 keys"
    )

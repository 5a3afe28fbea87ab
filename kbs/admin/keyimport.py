"""Parsing an operator's image private key for ``keylease-kbs key import``.

Accepted: one unencrypted RSA (>= 2048 bits) or EC (P-256, P-384, P-521) private key as PKCS#8,
PKCS#1 (``RSA PRIVATE KEY``) or SEC1 (``EC PRIVATE KEY``) PEM, or the same in DER. The key comes
out as unencrypted PKCS#8 PEM, the form ocicrypt accepts. Nothing here ever puts key bytes into an
error message.
"""

from __future__ import annotations

import re

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from kbs.errors import OperatorError
from keylease.secret import Secret

__all__ = ["MAX_KEY_FILE_BYTES", "MIN_RSA_BITS", "load_private_key"]

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
MAX_KEY_FILE_BYTES = 1 << 20
_CURVES = {"secp256r1": "P256", "secp384r1": "P384", "secp521r1": "P521"}
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_PRIVATE_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}
_PUBLIC_LABELS = {b"PUBLIC KEY", b"RSA PUBLIC KEY", b"CERTIFICATE", b"CERTIFICATE REQUEST"}
_ACCEPTED = "RSA >= 2048 bits or EC P-256/P-384/P-521 as PKCS#8, PKCS#1, SEC1 PEM or DER"


def _encrypted(source: str) -> OperatorError:
    return OperatorError(
        f"{source} is an encrypted (passphrase-protected) key; decrypt it first, e.g. "
        "`openssl pkey -in KEY -out plain.pem`, import it and delete the plain copy"
    )


def _pem_block(data: bytes, source: str) -> bytes:
    blocks = [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]
    if not blocks:
        raise OperatorError(f"{source} has a PEM header but no complete PEM block")
    labels = [label for label, _ in blocks]
    if b"ENCRYPTED PRIVATE KEY" in labels:
        raise _encrypted(source)
    if b"OPENSSH PRIVATE KEY" in labels:
        raise OperatorError(f"{source} is an OpenSSH key; image keys are {_ACCEPTED}")
    private = [block for label, block in blocks if label in _PRIVATE_LABELS]
    if len(private) > 1:
        raise OperatorError(f"{source} holds {len(private)} private keys; import one key per name")
    if not private:
        if any(label in _PUBLIC_LABELS for label in labels):
            raise OperatorError(
                f"{source} holds a public key or certificate, not a private key; "
                "import the private key (the public half is what images are encrypted to)"
            )
        names = ", ".join(sorted({label.decode() for label in labels}))
        raise OperatorError(
            f"{source} holds no private key (PEM blocks: {names}); expected {_ACCEPTED}"
        )
    block = private[0]
    if b"Proc-Type: 4,ENCRYPTED" in block:
        raise _encrypted(source)
    return block


def _parse(data: bytes, source: str) -> PrivateKeyTypes:
    is_pem = b"-----BEGIN " in data
    try:
        if is_pem:
            return serialization.load_pem_private_key(_pem_block(data, source), password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise _encrypted(source) from None
    except UnsupportedAlgorithm:
        raise OperatorError(f"{source}: unsupported key type; expected {_ACCEPTED}") from None
    except ValueError:
        pass
    if not is_pem:
        try:
            serialization.load_der_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            pass
        else:
            raise OperatorError(
                f"{source} is a public key, not a private key; import the private key"
            )
    kind = "PEM" if is_pem else "DER"
    raise OperatorError(
        f"{source} is not a valid private key ({kind} data does not parse); expected {_ACCEPTED}"
    )


def load_private_key(data: bytes, source: str) -> tuple[Secret, str]:
    """Parse ``data`` (named ``source`` in messages) into (PKCS#8 PEM, label like "RSA-3072")."""
    if not data.strip():
        raise OperatorError(f"{source} is empty; expected {_ACCEPTED}")
    if len(data) > MAX_KEY_FILE_BYTES:
        raise OperatorError(f"{source} is larger than {MAX_KEY_FILE_BYTES} bytes; not a key file")
    key = _parse(data, source)
    if isinstance(key, rsa.RSAPrivateKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise OperatorError(
                f"{source} is an RSA-{key.key_size} key; RSA keys must be {MIN_RSA_BITS} to "
                f"{MAX_RSA_BITS} bits (3072 or more recommended)"
            )
        label = f"RSA-{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        curve = _CURVES.get(key.curve.name)
        if curve is None:
            raise OperatorError(
                f"{source} is an EC key on curve {key.curve.name}; use P-256, P-384 or P-521"
            )
        label = f"EC-{curve}"
    else:
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        raise OperatorError(
            f"{source} is an {kind} key; ocicrypt image keys must be RSA or EC (P-256/P-384/P-521)"
        )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Secret(pem), label

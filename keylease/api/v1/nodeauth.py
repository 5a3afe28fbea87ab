"""Node calls that prove the node's identity: the per-node key and the call MAC.

At enrollment the broker's MakeCredential challenge carries a fresh 32-byte secret S that only
the TPM holding the node's EK and AK can recover (TPM2_ActivateCredential). Both sides derive the
node key from it::

    K = HKDF-SHA256(S, salt="", info="keylease.v1 node key" 0x00 node_name)

The broker keeps K sealed under its master key; the agent keeps only the challenge (public
bytes) and recovers S, hence K, with its TPM when it needs it. Every node call after enrollment
(``AUTHENTICATED_METHODS``) carries the gRPC metadata entry ``keylease-node-auth``::

    v1 <node_name> <base64(HMAC-SHA256(K, "keylease.v1 call" 0x00 method 0x00 node_name 0x00
                                          SHA-256(serialized request)))>

``method`` is the full gRPC method path; the request is hashed exactly as sent on the wire.
Exactly one encoding: standard base64 with padding, one space between the three parts. There is
no timestamp: TLS keeps a call from being recorded off the wire, and every call that matters is
bound to a single-use nonce anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keylease.secret import Secret

__all__ = [
    "ATTEST",
    "AUTHENTICATED_METHODS",
    "AUTH_METADATA_KEY",
    "GET_NONCE",
    "NODE_KEY_BYTES",
    "WATCH",
    "auth_metadata",
    "call_mac",
    "node_key",
    "parse_auth_header",
]

AUTH_METADATA_KEY = "keylease-node-auth"
SCHEME = "v1"
NODE_KEY_BYTES = 32
MAC_BYTES = 32
SERVICE = "/keylease.v1.NodeService/"
GET_NONCE = SERVICE + "GetNonce"
ATTEST = SERVICE + "Attest"
WATCH = SERVICE + "Watch"
AUTHENTICATED_METHODS = frozenset({GET_NONCE, ATTEST, WATCH})
_KEY_INFO = b"keylease.v1 node key\x00"
_CALL_LABEL = b"keylease.v1 call\x00"
_MAX_HEADER = 200  # "v1 " + a node name (at most 63) + " " + 44 base64 characters


def node_key(secret: bytes, node_name: str) -> Secret:
    """K for ``node_name`` from the credential-activation secret S (see the module text)."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=NODE_KEY_BYTES,
        salt=None,  # HKDF's default: HashLen zero bytes, the same key as an empty salt
        info=_KEY_INFO + node_name.encode(),
    )
    return Secret(hkdf.derive(secret))


def call_mac(key: Secret, method: str, node_name: str, request: bytes) -> bytes:
    """HMAC-SHA256 of one call: its method path, the node it names and its serialized request."""
    message = b"".join(
        [
            _CALL_LABEL,
            method.encode(),
            b"\x00",
            node_name.encode(),
            b"\x00",
            hashlib.sha256(request).digest(),
        ]
    )
    return hmac.new(key.reveal(), message, "sha256").digest()


def auth_metadata(
    key: Secret, method: str, node_name: str, request: bytes
) -> tuple[tuple[str, str]]:
    """The gRPC metadata proving this call comes from ``node_name``."""
    mac = base64.b64encode(call_mac(key, method, node_name, request)).decode()
    return ((AUTH_METADATA_KEY, f"{SCHEME} {node_name} {mac}"),)


def parse_auth_header(value: str) -> tuple[str, bytes] | None:
    """(node name, MAC) from a ``keylease-node-auth`` value, or None unless it is exactly in the
    one encoding above."""
    if len(value) > _MAX_HEADER:
        return None
    parts = value.split(" ")
    if len(parts) != 3 or parts[0] != SCHEME or not parts[1]:
        return None
    try:
        mac = base64.b64decode(parts[2], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(mac) != MAC_BYTES or base64.b64encode(mac).decode() != parts[2]:
        return None
    return parts[1], mac

"""TPM policy digests both sides compute identically (TPM 2.0 Part 3, 23): what a release's sealed
object is bound to, and what an approval approves. Pure functions over bytes; no TPM needed.

- ``sealed_auth_policy``: the sealed object's authPolicy, PolicyAuthorize(keySign, policyRef):
  ``H(H(0^32 || TPM_CC_PolicyAuthorize || keySign name) || policyRef)``, where keySign is the
  broker's release-signing key as a TPM public area (``signing_key_public``: ECC NIST P-256,
  ECDSA-SHA256, nameAlg SHA-256, sign + userWithAuth; what the agent loads with
  TPM2_LoadExternal) and ``policy_ref(node, group)`` = SHA-256("keylease.v1 approval" 0x00 node
  0x00 group): an approval opens only the objects of one node for one policy group.
- ``approved_policy``: the digest a policy session reaches after PolicyPCR(bank, indices, SHA-256
  of the values in ascending index order) and PolicyCounterTimer(clock limit as 8 bytes
  big-endian, offset 8 = TPMS_TIME_INFO.clockInfo.clock, TPM_EO_UNSIGNED_LT): "these PCR values,
  while the TPM clock is below the limit". The broker signs ``approved_policy || policy_ref``
  (TPM2_VerifySignature's aHash is its SHA-256); PolicyAuthorize accepts the ticket.
- ``policy_pcr_digest``: PolicyPCR alone, from a zero digest: the binding of releases from
  brokers before issue 11, which agents still open.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "BANKS",
    "TPMS_TIME_INFO_CLOCK",
    "TPM_EO_UNSIGNED_LT",
    "approved_policy",
    "pcr_selection",
    "policy_pcr_digest",
    "policy_ref",
    "sealed_auth_policy",
    "signing_key_name",
    "signing_key_public",
]

# bank -> (TPM_ALG_ID, digest size)
BANKS = {"sha1": (0x0004, 20), "sha256": (0x000B, 32), "sha384": (0x000C, 48)}
TPM_CC_POLICY_PCR = 0x0000017F
TPM_CC_POLICY_COUNTER_TIMER = 0x0000016D
TPM_CC_POLICY_AUTHORIZE = 0x0000016A
TPM_EO_UNSIGNED_LT = 0x0005
TPMS_TIME_INFO_CLOCK = 8  # offset of clockInfo.clock in TPMS_TIME_INFO (after UINT64 time)
_ALG_SHA256, _ALG_ECC, _ALG_ECDSA, _ALG_NULL, _ECC_NIST_P256 = 0x000B, 0x0023, 0x0018, 0x0010, 3
_SIGN_ENCRYPT, _USER_WITH_AUTH = 0x00040000, 0x00000040
_ZERO = bytes(32)
_REF_LABEL = b"keylease.v1 approval\x00"


def _update(digest: bytes, command: int, *args: bytes) -> bytes:
    return hashlib.sha256(digest + struct.pack(">I", command) + b"".join(args)).digest()


def pcr_selection(bank: str, indices: tuple[int, ...]) -> bytes:
    """Marshalled TPML_PCR_SELECTION of one bank, 3-byte bitmap (PCRs 0-23)."""
    bitmap = bytearray(3)
    for i in indices:
        bitmap[i // 8] |= 1 << (i % 8)
    return struct.pack(">IHB", 1, BANKS[bank][0], 3) + bytes(bitmap)


def _policy_pcr(digest: bytes, bank: str, pcrs: Mapping[int, bytes]) -> bytes:
    indices = tuple(sorted(pcrs))
    values = hashlib.sha256(b"".join(pcrs[i] for i in indices)).digest()
    return _update(digest, TPM_CC_POLICY_PCR, pcr_selection(bank, indices), values)


def policy_pcr_digest(bank: str, pcrs: Mapping[int, bytes]) -> bytes:
    """PolicyPCR over exactly ``pcrs`` (index -> value in ``bank``) from a fresh session."""
    return _policy_pcr(_ZERO, bank, pcrs)


def approved_policy(bank: str, pcrs: Mapping[int, bytes], clock_limit: int) -> bytes:
    """PolicyPCR(``pcrs``) then PolicyCounterTimer(clock < ``clock_limit``)."""
    args = hashlib.sha256(
        struct.pack(">QHH", clock_limit, TPMS_TIME_INFO_CLOCK, TPM_EO_UNSIGNED_LT)
    ).digest()
    return _update(_policy_pcr(_ZERO, bank, pcrs), TPM_CC_POLICY_COUNTER_TIMER, args)


def policy_ref(node_name: str, policy_group: str) -> bytes:
    """PolicyAuthorize's policyRef: binds approvals to one node and one policy group."""
    return hashlib.sha256(
        _REF_LABEL + node_name.encode() + b"\x00" + policy_group.encode()
    ).digest()


def signing_key_public(key: ec.EllipticCurvePublicKey) -> bytes:
    """The broker's release-signing key as a marshalled TPMT_PUBLIC (no size prefix)."""
    numbers = key.public_numbers()
    return (
        struct.pack(">HHIH", _ALG_ECC, _ALG_SHA256, _SIGN_ENCRYPT | _USER_WITH_AUTH, 0)
        + struct.pack(">HHHHH", _ALG_NULL, _ALG_ECDSA, _ALG_SHA256, _ECC_NIST_P256, _ALG_NULL)
        + struct.pack(">H", 32) + numbers.x.to_bytes(32, "big")
        + struct.pack(">H", 32) + numbers.y.to_bytes(32, "big")
    )  # fmt: skip


def signing_key_name(key: ec.EllipticCurvePublicKey) -> bytes:
    """The TPM name of ``signing_key_public(key)``: nameAlg || SHA-256(TPMT_PUBLIC)."""
    return struct.pack(">H", _ALG_SHA256) + hashlib.sha256(signing_key_public(key)).digest()


def sealed_auth_policy(key: ec.EllipticCurvePublicKey, node_name: str, group: str) -> bytes:
    """A release's authPolicy: PolicyAuthorize(keySign = ``key``, policyRef(node, group))."""
    digest = _update(_ZERO, TPM_CC_POLICY_AUTHORIZE, signing_key_name(key))
    return hashlib.sha256(digest + policy_ref(node_name, group)).digest()

"""Approvals: the broker's signed word that one boot state may open one node's sealed releases of
one policy group, until a limit in the node's TPM clock (keylease.proto ``Approval``).

Two signatures, by the broker's release-signing key (ECDSA P-256, SHA-256; its certificate
travels along and is checked as for releases, ``keylease.api.v1.signing``, valid at
``issued_at``, the broker's clock):

- ``authorization`` over ``approved_policy || policy_ref`` (``keylease.api.v1.tpmpolicy``): what
  the TPM itself checks (TPM2_VerifySignature, then PolicyAuthorize), so only the TPM decides
  whether the sealed object opens;
- ``signature`` over ``approval_payload``: every field, in one canonical encoding (the label
  ``keylease.v1 approval record`` 0x00, then each field as a 4-byte big-endian length and its
  bytes), so the description an agent logs and shows (components, origin) is the broker's too.

``verify_approval`` checks both in software before an agent keeps or uses an approval; the TPM
checks the first again when it opens the object. This module also converts between the typed
``Approval`` and its wire form (``ApprovalList``), for the agent's file and the broker's pushes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError

from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1.limits import (
    MAX_APPROVAL_TEXT,
    MAX_APPROVALS,
    MAX_APPROVED_COMPONENTS,
    MAX_NODE_NAME,
    MAX_PCR_INDEX,
    MAX_POLICY_GROUP,
    MAX_RELEASE_SIGNATURE,
    MAX_SIGNING_CERTIFICATE,
)
from keylease.api.v1.signing import SIGNATURE_ALGORITHM, SigningCertificate, signing_certificate
from keylease.api.v1.tpmpolicy import BANKS, approved_policy, policy_ref

__all__ = [
    "Approval",
    "ApprovedComponent",
    "approval_from_pb",
    "approval_payload",
    "approval_to_pb",
    "decode_approvals",
    "encode_approvals",
    "same_key",
    "values_match",
    "verify_approval",
]

_LABEL = b"keylease.v1 approval record\x00"
_MAX_CLOCK = (1 << 64) - 1
Certificates = dict[bytes, SigningCertificate]


@dataclass(frozen=True)
class ApprovedComponent:
    name: str
    value: str
    summary: str


@dataclass(frozen=True)
class Approval:
    node_name: str
    policy_group: str
    bank: str
    pcrs: tuple[tuple[int, bytes], ...]  # (index, value), indices ascending
    clock_limit: int  # TPM clock, ms: opens while the clock is below it
    components: tuple[ApprovedComponent, ...]
    origin: str
    issued_at: int  # unix seconds, the broker's clock
    signing_certificate: bytes  # DER
    authorization: bytes = b""  # DER ECDSA over authorization_message()
    signature: bytes = b""  # DER ECDSA over approval_payload()

    @property
    def values(self) -> dict[int, bytes]:
        return dict(self.pcrs)

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(i for i, _ in self.pcrs)

    def approved_policy(self) -> bytes:
        return approved_policy(self.bank, self.values, self.clock_limit)

    def authorization_message(self) -> bytes:
        """What ``authorization`` signs; SHA-256 of it is TPM2_VerifySignature's digest."""
        return self.approved_policy() + policy_ref(self.node_name, self.policy_group)

    def describe(self, limit: int = 6) -> str:
        """The state as the agent logs it, e.g. "policy prod-boot: boot-app.3
        \\EFI\\debian\\vmlinuz-6.1.0-28-amd64 (2b690a…c0), ...; canary worker-2": the components
        an update changes first (boot applications, kernel command line, initrd), then the rest
        (those the state does not show are left out)."""
        ordered = sorted((c for c in self.components if c.value != "absent"), key=_update_order)
        shown = [
            f"{c.name} {c.summary[:80]} ({_short(c.value)})".replace("  ", " ")
            for c in ordered[:limit]
        ]
        if len(ordered) > limit:
            shown.append(f"{len(ordered) - limit} more")
        parts = ", ".join(shown) or f"{self.bank} PCRs {','.join(map(str, self.indices))}"
        return f"policy {self.policy_group}: {parts}; {self.origin}"


def _update_order(c: ApprovedComponent) -> tuple[int, str]:
    kind = c.name.partition(".")[0]
    rank = {"boot-app": 0, "kernel-cmdline": 1, "initrd": 2}.get(kind, 3)
    return rank, (c.name.zfill(12) if kind == "boot-app" else c.name)


def _short(value: str) -> str:
    return f"{value[:6]}…{value[-2:]}" if len(value) > 12 else value


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _component(c: ApprovedComponent) -> bytes:
    return _field(c.name.encode()) + _field(c.value.encode()) + _field(c.summary.encode())


def approval_payload(a: Approval) -> bytes:
    """The bytes ``signature`` covers: every field but itself."""
    fields = [
        a.node_name.encode(),
        a.policy_group.encode(),
        a.bank.encode(),
        b"".join(struct.pack(">I", i) + _field(v) for i, v in a.pcrs),
        struct.pack(">Q", a.clock_limit),
        b"".join(_component(c) for c in a.components),
        a.origin.encode(),
        struct.pack(">q", a.issued_at),
        a.signing_certificate,
        a.authorization,
    ]
    return _LABEL + b"".join(_field(f) for f in fields)


def _check_shape(a: Approval, error: type[Exception]) -> None:
    """Sizes and values a TPM can use; ``error`` naming the first problem."""
    size = BANKS.get(a.bank, (0, 0))[1]
    if not size:
        raise error(f"the approval is for PCR bank {a.bank[:32]!r}, not sha1, sha256 or sha384")
    indices = a.indices
    if not indices or list(indices) != sorted(set(indices)) or indices[-1] > MAX_PCR_INDEX:
        raise error(f"the approval names no or invalid PCR indices {list(indices)[:24]}")
    if any(len(v) != size for _, v in a.pcrs):
        raise error(f"the approval's PCR values are not {a.bank} values")
    if not 0 < a.clock_limit <= _MAX_CLOCK:
        raise error("the approval's TPM clock limit is out of range")
    texts = [a.origin, *(t for c in a.components for t in (c.name, c.value, c.summary))]
    if (
        len(a.node_name) > MAX_NODE_NAME
        or len(a.policy_group) > MAX_POLICY_GROUP
        or len(a.components) > MAX_APPROVED_COMPONENTS
        or any(len(t) > MAX_APPROVAL_TEXT for t in texts)
        or len(a.signing_certificate) > MAX_SIGNING_CERTIFICATE
        or max(len(a.authorization), len(a.signature)) > MAX_RELEASE_SIGNATURE
    ):
        raise error("the approval is over the size limits")


def verify_approval(
    a: Approval,
    issuers: Sequence[x509.Certificate],
    error: type[Exception],
    checked: Certificates | None = None,
) -> SigningCertificate:
    """The approval's signing certificate, once it is shown to be the broker's (issued by one of
    ``issuers``, marked for signing, valid at ``issued_at``) and both signatures verify; raises
    ``error`` otherwise. ``checked`` caches certificate checks across calls (one per broker)."""
    _check_shape(a, error)
    if not a.signing_certificate or not a.authorization or not a.signature:
        raise error("the approval is not signed by the broker")
    cache = checked if checked is not None else {}
    cert = cache.get(a.signing_certificate)
    if cert is None:
        cert = signing_certificate(a.signing_certificate, issuers, error)
        cache[a.signing_certificate] = cert
    try:
        issued = datetime.fromtimestamp(a.issued_at, UTC)
    except (OverflowError, OSError, ValueError):
        raise error("the approval's issue time is out of range") from None
    if not cert.valid_at(issued):
        raise error("the approval's signing certificate was not valid when it was issued")
    for signature, message, what in (
        (a.signature, approval_payload(a), "description"),
        (a.authorization, a.authorization_message(), "authorization"),
    ):
        try:
            cert.key.verify(signature, message, SIGNATURE_ALGORITHM)
        except InvalidSignature:
            raise error(
                f"the approval's {what} signature does not verify with its signing key: it was "
                "not made by the broker, or was altered"
            ) from None
    return cert


def same_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


# --- wire ------------------------------------------------------------------------------------


def approval_to_pb(a: Approval) -> pb.Approval:
    return pb.Approval(
        node_name=a.node_name,
        policy_group=a.policy_group,
        pcr_bank=a.bank,
        pcrs=[pb.PcrValue(index=i, value=v) for i, v in a.pcrs],
        clock_limit=a.clock_limit,
        components=[
            pb.ApprovedComponent(name=c.name, value=c.value, summary=c.summary)
            for c in a.components
        ],
        origin=a.origin,
        issued_at_unix=a.issued_at,
        signing_certificate=a.signing_certificate,
        authorization=a.authorization,
        signature=a.signature,
    )


def approval_from_pb(msg: pb.Approval) -> Approval:
    """The typed approval (unchecked: ``verify_approval`` checks it)."""
    return Approval(
        node_name=msg.node_name,
        policy_group=msg.policy_group,
        bank=msg.pcr_bank,
        pcrs=tuple((p.index, bytes(p.value)) for p in msg.pcrs),
        clock_limit=msg.clock_limit,
        components=tuple(ApprovedComponent(c.name, c.value, c.summary) for c in msg.components),
        origin=msg.origin,
        issued_at=msg.issued_at_unix,
        signing_certificate=bytes(msg.signing_certificate),
        authorization=bytes(msg.authorization),
        signature=bytes(msg.signature),
    )


def encode_approvals(approvals: Iterable[Approval]) -> bytes:
    return pb.ApprovalList(approvals=[approval_to_pb(a) for a in approvals]).SerializeToString()


def decode_approvals(data: bytes, error: type[Exception]) -> tuple[Approval, ...]:
    """``encode_approvals``'s inverse; ``error`` for bytes that are not an ApprovalList or hold
    more than ``MAX_APPROVALS``."""
    msg = pb.ApprovalList()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        raise error("the approvals are not an ApprovalList") from None
    if len(msg.approvals) > MAX_APPROVALS:
        raise error(f"more than {MAX_APPROVALS} approvals")
    return tuple(approval_from_pb(a) for a in msg.approvals)


def values_match(a: Approval, current: Mapping[str, Mapping[int, bytes]]) -> bool:
    """Whether the PCRs ``current`` (bank -> index -> value) hold are the approved ones."""
    held = current.get(a.bank, {})
    return all(held.get(i) == v for i, v in a.pcrs)

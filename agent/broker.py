"""The agent's one client for the broker: TLS gRPC, a deadline on every call.

gRPC errors become agent errors here and nowhere else. Protobuf is parsed here, at the edge:
values in and out are typed (``agent.blobs`` and the replies below), and the rest of the agent
never sees a protobuf message. This module knows the wire, not the TPM or the keystore.

Every call after enrollment (GetNonce, Attest, Watch) is authenticated with the node's key
(``NodeIdentity``, ``keylease.api.v1.nodeauth``): the request is serialized here once and the
MAC made over exactly those bytes, which are sent as they are. The answers the agent acts on:
PERMISSION_DENIED with ``keylease-verdict: denied`` is ``AttestationDenied`` (the only one that
removes keys); PERMISSION_DENIED without it ``AttestationRefused``; UNAUTHENTICATED
``NotAuthenticated`` (enroll again); RESOURCE_EXHAUSTED ``BrokerBusy``; UNAVAILABLE and
DEADLINE_EXCEEDED ``BrokerUnreachable``; anything else ``BrokerError``. Texts from the broker
are escaped (``keylease.text.printable``) before anything logs or prints them.

The one call without a deadline is ``watch``: a stream of hints (REVOKED: remove the keys now;
CHANGED: attest again, and keep the approvals it may carry; HEARTBEAT: alive) that lasts until
the broker ends it or the caller cancels it. The channel sends HTTP/2 keepalive pings every 10 s,
so a dead broker or a broken path ends the stream with ``BrokerUnreachable`` within about 20 s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from agent.blobs import NodeIdentity, Quote, ReleaseBlob
from agent.config import AgentConfig
from agent.errors import (
    AgentError,
    AttestationDenied,
    AttestationRefused,
    BrokerBusy,
    BrokerError,
    BrokerUnreachable,
    ConfigError,
    EnrollmentRefused,
    NodeUnknown,
    NotAuthenticated,
)
from keylease.api.v1 import VERDICT_DENIED, VERDICT_KEY, SealedImport
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1 import keylease_pb2_grpc as pb_grpc
from keylease.api.v1.approvals import Approval, approval_from_pb
from keylease.api.v1.limits import MAX_APPROVALS, MAX_RELEASE_MESSAGE, MAX_WATCH_REASON
from keylease.api.v1.nodeauth import ATTEST, GET_NONCE, WATCH, auth_metadata
from keylease.text import printable

__all__ = [
    "AttestReply",
    "BrokerClient",
    "Challenge",
    "NodeIdentity",
    "Outcome",
    "WatchEvent",
    "WatchKind",
    "WatchStream",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Challenge:
    enrollment_id: str
    credential_blob: bytes
    encrypted_secret: bytes


class Outcome(Enum):
    PENDING_APPROVAL = "pending"
    RELEASED = "released"


@dataclass(frozen=True)
class AttestReply:
    outcome: Outcome
    release: ReleaseBlob | None


_STATES = {
    pb.NODE_STATE_PENDING: "pending",
    pb.NODE_STATE_APPROVED: "approved",
    pb.NODE_STATE_REVOKED: "revoked",
}
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# A dead broker must end a quiet watch stream: ping every 10 s, give up 10 s after an unanswered
# ping. The broker accepts pings every 5 s or slower (kbs.server).
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),  # any unanswered ping, not only keepalive ones
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]


class WatchKind(Enum):
    REVOKED = "revoked"
    CHANGED = "changed"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True)
class WatchEvent:
    """A hint from the broker; trust still comes only from attestation. ``approvals`` (with
    CHANGED, for a widened policy) are checked before the agent keeps them."""

    kind: WatchKind
    reason: str
    approvals: tuple[Approval, ...] = ()


_KINDS = {
    pb.WATCH_KIND_REVOKED: WatchKind.REVOKED,
    pb.WATCH_KIND_CHANGED: WatchKind.CHANGED,
    pb.WATCH_KIND_HEARTBEAT: WatchKind.HEARTBEAT,
}


def _watch_event(msg: pb.WatchEvent) -> WatchEvent:
    """An unknown (newer) kind counts as CHANGED: attesting again is always safe."""
    reason = printable(msg.reason, MAX_WATCH_REASON)
    approvals = tuple(approval_from_pb(a) for a in msg.approvals[:MAX_APPROVALS])
    kind = _KINDS.get(msg.kind)
    if kind is None:
        return WatchEvent(WatchKind.CHANGED, f"unknown event kind {msg.kind}: {reason}", approvals)
    return WatchEvent(kind, reason, approvals)


class _StreamingCall(Protocol):
    def __iter__(self) -> Iterator[pb.WatchEvent]: ...

    def cancel(self) -> bool: ...


class WatchStream:
    """One open Watch call. Iterate (in one thread) for events; ``cancel()`` from any thread."""

    def __init__(
        self, call: _StreamingCall, translate: Callable[[grpc.RpcError], AgentError]
    ) -> None:
        self._call = call
        self._translate = translate
        self._lock = threading.Lock()
        self._cancelled = False

    def __iter__(self) -> Iterator[WatchEvent]:
        """Events until the broker ends the stream or ``cancel()``; raises BrokerUnreachable,
        NodeUnknown or BrokerError."""
        try:
            for msg in self._call:
                yield _watch_event(msg)
        except grpc.RpcError as exc:
            with self._lock:
                if self._cancelled:
                    return
            raise self._translate(exc) from None

    def cancel(self) -> None:
        """End the stream; a blocked iteration stops (StopIteration). Thread-safe, idempotent."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
        self._call.cancel()


def _release(msg: pb.Release) -> ReleaseBlob:
    return ReleaseBlob(
        node_name=msg.node_name,
        sealed=SealedImport(
            duplicate=msg.duplicate,
            in_sym_seed=msg.in_sym_seed,
            sealed_public=msg.sealed_public,
            pcr_bank=msg.pcr_bank,
            pcr_indices=tuple(msg.pcr_indices),
        ),
        bundle_nonce=msg.bundle_nonce,
        bundle_ciphertext=msg.bundle_ciphertext,
        signing_certificate=msg.signing_certificate,
        signature=msg.signature,
        policy_group=msg.policy_group,
        approvals=tuple(approval_from_pb(a) for a in msg.approvals[:MAX_APPROVALS]),
    )


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Status code and details of a failed call (the sync client's errors are also grpc.Call)."""
    code_fn, details_fn = getattr(exc, "code", None), getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    return (
        code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
        printable(details if isinstance(details, str) else str(exc), 1000),
    )


def _trailing(exc: grpc.RpcError, key: str) -> str | None:
    """A trailing metadata value of a failed call."""
    trailing = getattr(exc, "trailing_metadata", None)
    for k, value in (trailing() if callable(trailing) else None) or ():
        if k == key and isinstance(value, str):
            return value
    return None


def _retry_after(exc: grpc.RpcError) -> float | None:
    """The broker's ``retry-after-ms`` hint (trailing metadata), in seconds."""
    value = _trailing(exc, "retry-after-ms")
    return int(value) / 1000 if value is not None and value.isdigit() else None


class BrokerClient:
    def __init__(self, cfg: AgentConfig) -> None:
        try:
            ca = cfg.kbs_ca.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read kbs_ca {cfg.kbs_ca}: {exc.strerror}") from None
        self._target = cfg.kbs
        self._timeout = cfg.rpc_timeout_seconds
        self._channel = grpc.secure_channel(
            cfg.kbs,
            grpc.ssl_channel_credentials(root_certificates=ca),
            options=[("grpc.max_receive_message_length", MAX_RELEASE_MESSAGE), *_KEEPALIVE],
        )
        self._stub = pb_grpc.NodeServiceStub(self._channel)
        # The authenticated calls send the bytes their MAC covers, serialized once, by us.
        self._get_nonce = self._channel.unary_unary(
            GET_NONCE, request_serializer=None, response_deserializer=pb.GetNonceResponse.FromString
        )
        self._attest = self._channel.unary_unary(
            ATTEST, request_serializer=None, response_deserializer=pb.AttestResponse.FromString
        )
        self._watch = self._channel.unary_stream(
            WATCH, request_serializer=None, response_deserializer=pb.WatchEvent.FromString
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, rpc: str, fn: Callable[[], T], refused: type[AgentError],
        denied: type[AgentError] = AttestationDenied,
    ) -> T:  # fmt: skip
        try:
            return fn()
        except grpc.RpcError as exc:
            raise self._error(rpc, exc, refused, denied) from None

    def _error(
        self, rpc: str, exc: grpc.RpcError, refused: type[AgentError],
        denied: type[AgentError] = AttestationDenied,
    ) -> AgentError:  # fmt: skip
        """The agent error for a failed call (the one translation of gRPC status codes):
        ``denied`` for a verdict on this node, ``refused`` for any other refusal."""
        code, text = _status(exc)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return BrokerBusy(f"broker {self._target} busy, retry later: {text}", _retry_after(exc))
        if code in _UNREACHABLE:
            return BrokerUnreachable(
                f"broker {self._target} unreachable ({code.name.lower()}: {text})"
            )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return NotAuthenticated(
                f"broker {self._target} does not accept this node's credentials ({text}); the "
                "node enrolls again"
            )
        if code == grpc.StatusCode.NOT_FOUND:
            return NodeUnknown(text or "node not enrolled")
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS):
            return denied(text) if _trailing(exc, VERDICT_KEY) == VERDICT_DENIED else refused(text)
        return BrokerError(f"broker refused {rpc} ({code.name}): {text}")

    def _watch_error(self, exc: grpc.RpcError) -> AgentError:
        code, text = _status(exc)
        if code == grpc.StatusCode.CANCELLED:  # not by us: the broker or the connection went
            return BrokerUnreachable(f"watch stream from broker {self._target} cut off: {text}")
        return self._error("watch", exc, AttestationRefused)

    def _signed(
        self, identity: NodeIdentity, method: str, request: Message
    ) -> tuple[bytes, tuple[tuple[str, str]]]:
        raw = request.SerializeToString()
        return raw, auth_metadata(identity.key, method, identity.node_name, raw)

    def watch(self, identity: NodeIdentity) -> WatchStream:
        """Open the broker's hint stream for this node (no deadline; see WatchStream). Errors
        (credentials refused, unreachable broker) surface when iterating."""
        raw, metadata = self._signed(identity, WATCH, pb.WatchRequest(node_name=identity.node_name))
        call: _StreamingCall = self._watch(raw, metadata=metadata)
        return WatchStream(call, self._watch_error)

    def start_enrollment(
        self,
        node_name: str,
        ek_certificate: bytes,
        ek_public: bytes,
        ak_public: bytes,
        metadata: Mapping[str, str],
    ) -> Challenge:
        req = pb.StartEnrollmentRequest(
            node_name=node_name,
            ek_certificate=ek_certificate,
            ek_public=ek_public,
            ak_public=ak_public,
            metadata=dict(metadata),
        )
        resp = self._call(
            "enrollment",
            lambda: self._stub.StartEnrollment(req, timeout=self._timeout),
            EnrollmentRefused,
            EnrollmentRefused,
        )
        return Challenge(resp.enrollment_id, resp.credential_blob, resp.encrypted_secret)

    def finish_enrollment(self, enrollment_id: str, secret: bytes) -> str:
        req = pb.FinishEnrollmentRequest(enrollment_id=enrollment_id, secret=secret)
        resp = self._call(
            "enrollment",
            lambda: self._stub.FinishEnrollment(req, timeout=self._timeout),
            EnrollmentRefused,
            EnrollmentRefused,
        )
        return _STATES.get(resp.state, "unknown")

    def get_nonce(self, identity: NodeIdentity) -> bytes:
        raw, metadata = self._signed(
            identity, GET_NONCE, pb.GetNonceRequest(node_name=identity.node_name)
        )
        resp: pb.GetNonceResponse = self._call(
            "nonce",
            lambda: self._get_nonce(raw, metadata=metadata, timeout=self._timeout),
            AttestationRefused,
        )
        return bytes(resp.nonce)

    def attest(
        self,
        identity: NodeIdentity,
        nonce: bytes,
        quote: Quote,
        event_log: bytes,
    ) -> AttestReply:
        req = pb.AttestRequest(
            node_name=identity.node_name,
            nonce=nonce,
            quote=quote.attest,
            signature=quote.signature,
            banks=[
                pb.PcrBank(
                    bank=bank,
                    pcrs=[pb.PcrValue(index=i, value=v) for i, v in sorted(values.items())],
                )
                for bank, values in quote.banks.items()
            ],
            event_log=event_log,
        )
        raw, metadata = self._signed(identity, ATTEST, req)
        resp: pb.AttestResponse = self._call(
            "attestation",
            lambda: self._attest(raw, metadata=metadata, timeout=self._timeout),
            AttestationRefused,
        )
        if resp.outcome == pb.ATTEST_OUTCOME_PENDING_APPROVAL:
            return AttestReply(Outcome.PENDING_APPROVAL, None)
        if resp.outcome == pb.ATTEST_OUTCOME_RELEASED and resp.HasField("release"):
            return AttestReply(Outcome.RELEASED, _release(resp.release))
        raise BrokerError(f"broker answered attestation with unknown outcome {resp.outcome}")

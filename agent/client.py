"""The agent's one client for the broker: TLS gRPC, a deadline on every call.

gRPC errors become agent errors here and nowhere else. Values in and out are typed; the rest
of the agent never sees protobuf messages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import grpc

from agent.config import AgentConfig
from agent.errors import (
    AgentError,
    AttestationDenied,
    BrokerError,
    BrokerUnreachable,
    ConfigError,
    EnrollmentRefused,
)
from agent.release import ReleaseBlob
from agent.tpm import Quote
from kbs.api.v1 import keylease_pb2 as pb
from kbs.api.v1 import keylease_pb2_grpc as pb_grpc

__all__ = ["AttestReply", "BrokerClient", "Challenge", "NodeUnknown"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class NodeUnknown(BrokerError):
    """The broker does not know this node (never enrolled there, or its record was removed)."""


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


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Status code and details of a failed call (the sync client's errors are also grpc.Call)."""
    code_fn, details_fn = getattr(exc, "code", None), getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    return (
        code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
        details if isinstance(details, str) else str(exc),
    )


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
            options=[("grpc.max_receive_message_length", 4 << 20)],
        )
        self._stub = pb_grpc.NodeServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, rpc: str, fn: Callable[[], T], denied: type[AgentError]) -> T:
        try:
            return fn()
        except grpc.RpcError as exc:
            code, text = _status(exc)
            if code in _UNREACHABLE:
                raise BrokerUnreachable(
                    f"broker {self._target} unreachable ({code.name.lower()}: {text})"
                ) from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise NodeUnknown(text or "node not enrolled") from None
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS):
                raise denied(text) from None
            raise BrokerError(f"broker refused {rpc} ({code.name}): {text}") from None

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
        )
        return Challenge(resp.enrollment_id, resp.credential_blob, resp.encrypted_secret)

    def finish_enrollment(self, enrollment_id: str, secret: bytes) -> str:
        req = pb.FinishEnrollmentRequest(enrollment_id=enrollment_id, secret=secret)
        resp = self._call(
            "enrollment",
            lambda: self._stub.FinishEnrollment(req, timeout=self._timeout),
            EnrollmentRefused,
        )
        return _STATES.get(resp.state, "unknown")

    def get_nonce(self, node_name: str) -> bytes:
        req = pb.GetNonceRequest(node_name=node_name)
        resp = self._call(
            "nonce", lambda: self._stub.GetNonce(req, timeout=self._timeout), AttestationDenied
        )
        return bytes(resp.nonce)

    def attest(
        self,
        node_name: str,
        nonce: bytes,
        ephemeral_public: bytes,
        quote: Quote,
        event_log: bytes,
    ) -> AttestReply:
        req = pb.AttestRequest(
            node_name=node_name,
            nonce=nonce,
            ephemeral_public=ephemeral_public,
            quote=quote.attest,
            signature=quote.signature,
            pcr_bank=quote.pcr_bank,
            pcrs=[pb.PcrValue(index=i, value=v) for i, v in sorted(quote.pcrs.items())],
            event_log=event_log,
        )
        resp = self._call(
            "attestation", lambda: self._stub.Attest(req, timeout=self._timeout), AttestationDenied
        )
        if resp.outcome == pb.ATTEST_OUTCOME_PENDING_APPROVAL:
            return AttestReply(Outcome.PENDING_APPROVAL, None)
        if resp.outcome == pb.ATTEST_OUTCOME_RELEASED and resp.HasField("release"):
            return AttestReply(Outcome.RELEASED, ReleaseBlob.from_pb(resp.release))
        raise BrokerError(f"broker answered attestation with unknown outcome {resp.outcome}")

"""The node-facing gRPC service: protobuf in, typed values to the domain, protobuf out.

This is the one place where broker errors become gRPC status codes: a ``KbsError`` answers with its
``grpc_code`` and operator-readable text; anything else is logged and answered INTERNAL without
details. Refusals and denials are written to the audit log here.

``Watch`` streams hints from the change feed (``kbs.changefeed``) to one node: subscribe first,
then look the node up, so that nothing between the two is missed; REVOKED at once for a revoked
node, otherwise a first HEARTBEAT, then the node's notices and a HEARTBEAT every
``HEARTBEAT_INTERVAL`` seconds. The stream ends (OK) when the feed closes it.

Where the domain code runs: on SQLite (a local file; statements take microseconds and writes are
serialised by one lock anyway) it runs on the event loop. Handing every call to a worker thread
cost more CPU than the call itself: 3.4 -> 2.1 ms of broker CPU per attestation at 8 in flight
(``scripts.bench_fleet --mode max``), most of it thread wake-ups and GIL contention with gRPC's
threads. On PostgreSQL calls wait on the network, so they run in worker threads and overlap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from kbs import attest as attest_step
from kbs import enroll as enroll_step
from kbs.changefeed import ChangeFeed, FeedClosed, Notice, Subscription
from kbs.context import BrokerContext
from kbs.errors import AttestationFailed, EnrollmentRefused, InvalidRequest, KbsError, UnknownNode
from kbs.metrics import BrokerMetrics
from kbs.model import ChangeKind, NodeState
from kbs.names import check_node_name
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1 import keylease_pb2_grpc as pb_grpc

__all__ = ["NodeService", "limits"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Upper bounds for every variable-size field: generous for real TPMs, small enough that a
# malicious node cannot make the broker parse megabytes of garbage.
MAX_NAME = 63
MAX_CERT = 8192
MAX_TPM_PUBLIC = 1024
MAX_QUOTE = 2048
MAX_SIGNATURE = 1024
MAX_EVENT_LOG = 1 << 20
MAX_METADATA_ENTRIES = 32
MAX_METADATA_TEXT = 256
MAX_PROOF = 64
HEARTBEAT_INTERVAL = 15.0


def limits() -> dict[str, int]:
    return {
        "node_name": MAX_NAME,
        "ek_certificate": MAX_CERT,
        "tpm_public": MAX_TPM_PUBLIC,
        "quote": MAX_QUOTE,
        "signature": MAX_SIGNATURE,
        "event_log": MAX_EVENT_LOG,
    }


def _bounded(field: str, value: bytes | str, limit: int, *, required: bool = True) -> None:
    if required and not value:
        raise InvalidRequest(f"{field} is required")
    if len(value) > limit:
        raise InvalidRequest(f"{field} is {len(value)} bytes; the limit is {limit}")


_STATES = {
    NodeState.PENDING: pb.NODE_STATE_PENDING,
    NodeState.APPROVED: pb.NODE_STATE_APPROVED,
    NodeState.REVOKED: pb.NODE_STATE_REVOKED,
}
_KINDS = {ChangeKind.REVOKED: pb.WATCH_KIND_REVOKED, ChangeKind.CHANGED: pb.WATCH_KIND_CHANGED}


class NodeService(pb_grpc.NodeServiceServicer):
    def __init__(
        self,
        ctx: BrokerContext,
        feed: ChangeFeed,
        heartbeat: float = HEARTBEAT_INTERVAL,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self._ctx = ctx
        self._feed = feed
        self._heartbeat = heartbeat
        self._metrics = metrics or BrokerMetrics()
        self._inline = ctx.store.is_sqlite

    async def _run(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        event: str,
        node: str,
        fn: Callable[[], T],
    ) -> T:
        try:
            if self._inline:
                return fn()
            return await asyncio.to_thread(fn)
        except KbsError as exc:
            self._metrics.failed(event, _result(exc), exc)
            self._audit_refusal(event, node, exc)
            log.info("%s node=%s result=%s reason=%s", event, node or "-", _result(exc), exc)
            await _abort(context, exc.grpc_code, exc.diagnostics())
        except Exception:  # the service's top-level guard: never leak internals to the peer
            self._metrics.outcome(event, "error", "internal")
            log.exception("%s node=%s failed with an internal error", event, node or "-")
            await _abort(context, grpc.StatusCode.INTERNAL, "internal error; see the broker log")

    def _audit_refusal(self, event: str, node: str, exc: KbsError) -> None:
        if not node:  # no node to attribute it to (or refused before the name was known)
            return
        try:
            self._ctx.store.audit(
                actor=f"node:{node}" if node else "node:?",
                event=event,
                node=node or None,
                result=_result(exc),
                detail=f"{type(exc).__name__}: {exc}"[:1000],
                now=self._ctx.clock(),
            )
        except KbsError as db_exc:
            self._metrics.db_errors.inc()
            log.warning("could not write the audit record for %s node=%s: %s", event, node, db_exc)

    async def StartEnrollment(
        self, request: pb.StartEnrollmentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StartEnrollmentResponse:
        def run() -> enroll_step.Challenge:
            _bounded("node_name", request.node_name, MAX_NAME)
            _bounded("ek_certificate", request.ek_certificate, MAX_CERT)
            _bounded("ek_public", request.ek_public, MAX_TPM_PUBLIC)
            _bounded("ak_public", request.ak_public, MAX_TPM_PUBLIC)
            if len(request.metadata) > MAX_METADATA_ENTRIES:
                raise InvalidRequest(f"metadata has more than {MAX_METADATA_ENTRIES} entries")
            for k, v in request.metadata.items():
                _bounded("metadata key", k, MAX_METADATA_TEXT)
                _bounded("metadata value", v, MAX_METADATA_TEXT, required=False)
            return enroll_step.start(
                self._ctx,
                enroll_step.EnrollmentRequest(
                    node_name=request.node_name,
                    ek_certificate=request.ek_certificate,
                    ek_public=request.ek_public,
                    ak_public=request.ak_public,
                    metadata=dict(request.metadata),
                ),
            )

        challenge = await self._run(context, "enroll", _name(request.node_name), run)
        return pb.StartEnrollmentResponse(
            enrollment_id=challenge.enrollment_id,
            credential_blob=challenge.credential_blob,
            encrypted_secret=challenge.encrypted_secret,
        )

    async def FinishEnrollment(
        self, request: pb.FinishEnrollmentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.FinishEnrollmentResponse:
        def run() -> tuple[str, NodeState]:
            _bounded("enrollment_id", request.enrollment_id, 64)
            _bounded("secret", request.secret, MAX_PROOF)
            return enroll_step.finish(self._ctx, request.enrollment_id, request.secret)

        _, state = await self._run(context, "enroll", "", run)
        self._metrics.outcome("enroll", "ok")
        return pb.FinishEnrollmentResponse(state=_STATES[state])

    async def GetNonce(
        self, request: pb.GetNonceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetNonceResponse:
        def run() -> tuple[bytes, int]:
            _bounded("node_name", request.node_name, MAX_NAME)
            nonce, expires = attest_step.issue_nonce(self._ctx, request.node_name)
            return nonce, int(expires.timestamp())

        nonce, expires_at = await self._run(context, "nonce", _name(request.node_name), run)
        return pb.GetNonceResponse(nonce=nonce, expires_at_unix=expires_at)

    async def Attest(
        self, request: pb.AttestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AttestResponse:
        def run() -> attest_step.AttestResult:
            return attest_step.attest(self._ctx, _evidence(request))

        result = await self._run(context, "attest", _name(request.node_name), run)
        if result.release is None:
            self._metrics.outcome("attest", "pending")
            return pb.AttestResponse(outcome=pb.ATTEST_OUTCOME_PENDING_APPROVAL)
        rel = result.release
        self._metrics.outcome("attest", "released")
        self._metrics.released(rel.keys)
        return pb.AttestResponse(
            outcome=pb.ATTEST_OUTCOME_RELEASED,
            release=pb.Release(
                duplicate=rel.sealed.duplicate,
                in_sym_seed=rel.sealed.in_sym_seed,
                sealed_public=rel.sealed.sealed_public,
                pcr_bank=rel.sealed.pcr_bank,
                pcr_indices=list(rel.sealed.pcr_indices),
                bundle_nonce=rel.bundle_nonce,
                bundle_ciphertext=rel.bundle_ciphertext,
                node_name=rel.node_name,
            ),
        )

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchEvent]:
        name = request.node_name
        try:
            _bounded("node_name", name, MAX_NAME)
            check_node_name(name)
            sub = self._feed.subscribe(name)
        except KbsError as exc:
            log.info("watch node=%s result=refused reason=%s", _name(name) or "-", exc)
            await _abort(context, exc.grpc_code, exc.diagnostics())
        why = "the client went away"
        started = False
        try:
            state = await self._run(context, "watch", name, lambda: self._node_state(name))
            started = True
            log.info("watch node=%s started (%s)", name, state.value)
            if state is NodeState.REVOKED:
                yield pb.WatchEvent(kind=pb.WATCH_KIND_REVOKED, reason="the node is revoked")
            else:
                yield pb.WatchEvent(kind=pb.WATCH_KIND_HEARTBEAT, reason="watching")
            async for event in self._events(sub):
                yield event
            why = sub.closed_because
        finally:
            self._feed.unsubscribe(sub)
            if started:
                log.info("watch node=%s ended (%s)", name, why)

    async def _events(self, sub: Subscription) -> AsyncIterator[pb.WatchEvent]:
        """The subscription's notices, a heartbeat whenever it is quiet; ends when it closes."""
        while True:
            try:
                notice = await sub.next(self._heartbeat)
            except FeedClosed:
                return
            yield _watch_event(notice)

    def _node_state(self, name: str) -> NodeState:
        node = self._ctx.store.get_node(name)
        if node is None:
            raise UnknownNode(f"node {name!r} is not enrolled; enroll it before watching")
        return node.state


def _watch_event(notice: Notice | None) -> pb.WatchEvent:
    if notice is None:
        return pb.WatchEvent(kind=pb.WATCH_KIND_HEARTBEAT)
    return pb.WatchEvent(kind=_KINDS[notice.kind], reason=notice.reason)


def _evidence(request: pb.AttestRequest) -> attest_step.Evidence:
    _bounded("node_name", request.node_name, MAX_NAME)
    _bounded("nonce", request.nonce, 64)
    _bounded("quote", request.quote, MAX_QUOTE)
    _bounded("signature", request.signature, MAX_SIGNATURE)
    _bounded("pcr_bank", request.pcr_bank, 16)
    _bounded("event_log", request.event_log, MAX_EVENT_LOG, required=False)
    if not request.pcrs or len(request.pcrs) > 24:
        raise InvalidRequest(f"pcrs must hold 1 to 24 values, got {len(request.pcrs)}")
    pcrs: dict[int, bytes] = {}
    for pcr in request.pcrs:
        if pcr.index > 23:
            raise InvalidRequest(f"PCR index {pcr.index} is out of range 0-23")
        if pcr.index in pcrs:
            raise InvalidRequest(f"PCR {pcr.index} is sent twice")
        _bounded(f"PCR {pcr.index} value", pcr.value, 64)
        pcrs[pcr.index] = pcr.value
    return attest_step.Evidence(
        node_name=request.node_name,
        nonce=request.nonce,
        quote=request.quote,
        signature=request.signature,
        pcr_bank=request.pcr_bank,
        pcrs=pcrs,
        event_log=request.event_log,
    )


def _name(name: str) -> str:
    """A node name fit for a log line and an audit record (validated later by the domain)."""
    return name if len(name) <= MAX_NAME and name.isprintable() else ""


def _result(exc: KbsError) -> str:
    if isinstance(exc, EnrollmentRefused):
        return "refused"
    if isinstance(exc, AttestationFailed):
        return "denied"
    return "error"


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, text: str
) -> NoReturn:
    await context.abort(code, text)
    raise AssertionError("unreachable: context.abort raises")

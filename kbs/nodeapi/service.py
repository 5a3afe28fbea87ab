"""The node-facing gRPC service: protobuf in, typed values to the protocol steps, protobuf out.

This is the one place where broker errors become the node API's status codes: a ``KbsError``
answers with the code ``kbs.status.STATUS`` gives its exact class, and its
operator-readable text; anything else is logged and answered INTERNAL without details. The
classes in ``VERIFIED_DENIALS`` — a verdict on the node that proved its identity: revoked, no
policy, policy or event log refuse it, nothing granted, its TPM's counters went back — also carry
the trailing metadata ``keylease-verdict: denied``: the only answer on which an agent removes its
keys. Callers reach these handlers only through ``kbs.nodeapi.admission``, which has already
checked that GetNonce, Attest and Watch come from the node they name. Every field is checked
against ``keylease.api.v1.limits`` before anything parses it. Refusals of a node that proved
itself are written to the audit log here; the others (anyone can cause them: enrollment) are a
metric and a throttled log line (``kbs.nodeapi.refusals``).

``Watch`` streams hints from the change feed (``kbs.nodeapi.changefeed``) to one node: subscribe
first, then look the node up, so that nothing between the two is missed; REVOKED at once for a
revoked node, otherwise a first HEARTBEAT, then the node's notices (a CHANGED for a widened
policy carries the node's new approvals) and a HEARTBEAT every ``HEARTBEAT_INTERVAL`` seconds.
The stream ends (OK) when the feed closes it.

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
from kbs import enrollment as enroll_step
from kbs import errors as e
from kbs.context import BrokerContext
from kbs.model import ChangeKind, NodeState, check_node_name
from kbs.nodeapi.changefeed import ChangeFeed, Notice, Subscription
from kbs.nodeapi.metrics import BrokerMetrics
from kbs.nodeapi.refusals import ThrottledLog, proves_identity
from kbs.nodeapi.status import VERIFIED_DENIALS
from kbs.nonces import issue_nonce
from kbs.status import status_code
from keylease.api.v1 import VERDICT_DENIED, VERDICT_KEY
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1 import keylease_pb2_grpc as pb_grpc
from keylease.api.v1.approvals import approval_to_pb
from keylease.api.v1.limits import (
    MAX_EK_CERTIFICATE,
    MAX_ENROLLMENT_ID,
    MAX_EVENT_LOG,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_TEXT,
    MAX_NODE_NAME,
    MAX_NONCE,
    MAX_PCR_BANK,
    MAX_PCR_BANKS,
    MAX_PCR_INDEX,
    MAX_PCR_VALUE,
    MAX_PROOF,
    MAX_QUOTE,
    MAX_SIGNATURE,
    MAX_TPM_PUBLIC,
)
from keylease.text import printable

__all__ = ["HEARTBEAT_INTERVAL", "NodeService"]

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_INTERVAL = 15.0


def _bounded(field: str, value: bytes | str, limit: int, *, required: bool = True) -> None:
    if required and not value:
        raise e.InvalidRequest(f"{field} is required")
    if len(value) > limit:
        raise e.InvalidRequest(f"{field} is {len(value)} bytes; the limit is {limit}")


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
        enrolled: Callable[[str], None] = lambda _name: None,
    ) -> None:
        """``enrolled(name)``: told after each successful enrollment (the node key changed)."""
        self._ctx = ctx
        self._feed = feed
        self._enrolled = enrolled
        self._heartbeat = heartbeat
        self._metrics = metrics or BrokerMetrics()
        self._inline = ctx.store.is_sqlite
        self._throttled = ThrottledLog(log)

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
        except e.KbsError as exc:
            self._metrics.failed(event, _result(exc), exc)
            self._audit_refusal(event, node, exc)
            verdict = ((VERDICT_KEY, VERDICT_DENIED),) if type(exc) in VERIFIED_DENIALS else ()
            await context.abort(status_code(exc), exc.diagnostics(), trailing_metadata=verdict)
            raise AssertionError("unreachable: context.abort raises") from None
        except Exception:  # the service's top-level guard: never leak internals to the peer
            self._metrics.outcome(event, "error", "internal")
            log.exception("%s node=%s failed with an internal error", event, node or "-")
            await _abort(context, grpc.StatusCode.INTERNAL, "internal error; see the broker log")

    def _audit_refusal(self, event: str, node: str, exc: e.KbsError) -> None:
        """An audit row and a log line for a refusal of a node that proved itself; for any other
        refusal a metric and a throttled log line (one per step and error class every 10 s)."""
        result = _result(exc)
        if not node or not proves_identity(event, exc):
            self._metrics.unproven_refusals.labels(event, type(exc).__name__).inc()
            self._throttled.log(
                logging.INFO,
                (event, type(exc)),
                "%s node=%s result=%s reason=%s",
                event,
                printable(node) or "-",
                result,
                printable(str(exc)),
            )
            return
        log.info("%s node=%s result=%s reason=%s", event, node, result, printable(str(exc)))
        try:
            self._ctx.store.audit(
                actor=f"node:{node}" if node else "node:?",
                event=event,
                node=node or None,
                result=result,
                detail=printable(f"{type(exc).__name__}: {exc}", 1000),
                now=self._ctx.clock(),
            )
        except e.KbsError as db_exc:
            self._metrics.db_errors.inc()
            log.warning("could not write the audit record for %s node=%s: %s", event, node, db_exc)

    async def StartEnrollment(
        self, request: pb.StartEnrollmentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StartEnrollmentResponse:
        def run() -> enroll_step.Challenge:
            return enroll_step.start(self._ctx, _enrollment_request(request))

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
            _bounded("enrollment_id", request.enrollment_id, MAX_ENROLLMENT_ID)
            _bounded("secret", request.secret, MAX_PROOF)
            return enroll_step.finish(self._ctx, request.enrollment_id, request.secret)

        name, state = await self._run(context, "enroll", "", run)
        self._enrolled(name)
        self._metrics.outcome("enroll", "ok")
        return pb.FinishEnrollmentResponse(state=_STATES[state])

    async def GetNonce(
        self, request: pb.GetNonceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetNonceResponse:
        def run() -> tuple[bytes, int]:
            _bounded("node_name", request.node_name, MAX_NODE_NAME)
            nonce, expires = issue_nonce(self._ctx, request.node_name)
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
                signing_certificate=rel.signing_certificate,
                signature=rel.signature,
                policy_group=rel.policy_group,
                approvals=[approval_to_pb(a) for a in rel.approvals],
            ),
        )

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchEvent]:
        name = request.node_name
        try:
            _bounded("node_name", name, MAX_NODE_NAME)
            check_node_name(name)
            sub = self._feed.subscribe(name)
        except e.KbsError as exc:
            self._throttled.log(
                logging.INFO,
                ("watch", type(exc)),
                "watch node=%s result=refused reason=%s",
                _name(name) or "-",
                exc,
            )
            await _abort(context, status_code(exc), exc.diagnostics())
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
            except e.FeedClosed:
                return
            yield _watch_event(notice)

    def _node_state(self, name: str) -> NodeState:
        node = self._ctx.store.get_node(name)
        if node is None:
            raise e.UnknownNode(f"node {name!r} is not enrolled; enroll it before watching")
        return node.state


def _watch_event(notice: Notice | None) -> pb.WatchEvent:
    if notice is None:
        return pb.WatchEvent(kind=pb.WATCH_KIND_HEARTBEAT)
    event = pb.WatchEvent(kind=_KINDS[notice.kind], reason=notice.reason)
    if notice.payload:  # an ApprovalList's approvals are field 1; here they are field 3
        event.approvals.extend(pb.ApprovalList.FromString(notice.payload).approvals)
    return event


def _bank_values(bank: pb.PcrBank) -> dict[int, bytes]:
    _bounded("PCR bank name", bank.bank, MAX_PCR_BANK)
    if not bank.pcrs or len(bank.pcrs) > MAX_PCR_INDEX + 1:
        raise e.InvalidRequest(
            f"bank {bank.bank!r} must hold 1 to {MAX_PCR_INDEX + 1} PCR values, "
            f"got {len(bank.pcrs)}"
        )
    pcrs: dict[int, bytes] = {}
    for pcr in bank.pcrs:
        if pcr.index > MAX_PCR_INDEX:
            raise e.InvalidRequest(f"PCR index {pcr.index} is out of range 0-{MAX_PCR_INDEX}")
        if pcr.index in pcrs:
            raise e.InvalidRequest(f"PCR {pcr.index} of bank {bank.bank!r} is sent twice")
        _bounded(f"PCR {pcr.index} value", pcr.value, MAX_PCR_VALUE)
        pcrs[pcr.index] = pcr.value
    return pcrs


def _enrollment_request(request: pb.StartEnrollmentRequest) -> enroll_step.EnrollmentRequest:
    _bounded("node_name", request.node_name, MAX_NODE_NAME)
    _bounded("ek_certificate", request.ek_certificate, MAX_EK_CERTIFICATE)
    _bounded("ek_public", request.ek_public, MAX_TPM_PUBLIC)
    _bounded("ak_public", request.ak_public, MAX_TPM_PUBLIC)
    if len(request.metadata) > MAX_METADATA_ENTRIES:
        raise e.InvalidRequest(f"metadata has more than {MAX_METADATA_ENTRIES} entries")
    for k, v in request.metadata.items():
        _bounded("metadata key", k, MAX_METADATA_TEXT)
        _bounded("metadata value", v, MAX_METADATA_TEXT, required=False)
    return enroll_step.EnrollmentRequest(
        node_name=request.node_name,
        ek_certificate=request.ek_certificate,
        ek_public=request.ek_public,
        ak_public=request.ak_public,
        metadata=dict(request.metadata),
    )


def _evidence(request: pb.AttestRequest) -> attest_step.Evidence:
    _bounded("node_name", request.node_name, MAX_NODE_NAME)
    _bounded("nonce", request.nonce, MAX_NONCE)
    _bounded("quote", request.quote, MAX_QUOTE)
    _bounded("signature", request.signature, MAX_SIGNATURE)
    _bounded("event_log", request.event_log, MAX_EVENT_LOG, required=False)
    if not request.banks or len(request.banks) > MAX_PCR_BANKS:
        raise e.InvalidRequest(
            f"banks must hold 1 to {MAX_PCR_BANKS} PCR banks, got {len(request.banks)}"
        )
    banks: dict[str, dict[int, bytes]] = {}
    for bank in request.banks:
        if bank.bank in banks:
            raise e.InvalidRequest(f"PCR bank {bank.bank[:MAX_PCR_BANK]!r} is sent twice")
        banks[bank.bank] = _bank_values(bank)
    return attest_step.Evidence(
        node_name=request.node_name,
        nonce=request.nonce,
        quote=request.quote,
        signature=request.signature,
        banks=banks,
        event_log=request.event_log,
    )


def _name(name: str) -> str:
    """A node name fit for a log line and an audit record (validated later by the domain)."""
    return name if len(name) <= MAX_NODE_NAME and name.isprintable() else ""


def _result(exc: e.KbsError) -> str:
    if isinstance(exc, e.EnrollmentRefused):
        return "refused"
    if isinstance(exc, e.AttestationFailed):
        return "denied"
    return "error"


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, text: str
) -> NoReturn:
    await context.abort(code, text)
    raise AssertionError("unreachable: context.abort raises")

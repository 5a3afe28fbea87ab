"""Admission control for the node-facing service: a gRPC server interceptor.

Every request passes, in order:

1. **per-peer rate** (token bucket per client IP address, ``context.peer()``) and **per-peer
   in-flight** cap (unfinished requests from that address; for Watch only until its request is
   read, so a fleet behind one NAT address can keep its streams open);
2. **receiving the request within the deadline**: unary methods are served as client-streaming
   handlers so that the request message is read here, under ``rpc_deadline_seconds``. A client
   that opens calls and never sends (or sends slowly) is cut off instead of holding the server's
   concurrency slots. The request is kept as received too: its bytes are what the node's MAC
   covers;
3. **node authentication** for GetNonce, Attest and Watch (``kbs.nodeapi.nodeauth``): the call
   must carry a MAC made with the key of the node its request names, else UNAUTHENTICATED "node
   call not authenticated" (no audit row: a metric and a rate-limited log line). Until here a
   call has spent only its peer's budget;
4. **per-node rate** (token bucket per node name, spent only by calls that proved the node) or,
   for StartEnrollment, **per-EK rate** (token bucket per EK hash: enrollment is open to anyone
   holding a trusted EK certificate, and a stranger replaying a node's public EK data spends that
   EK's budget only);
5. for enrollment and attestation, a **concurrency slot** (``max_concurrent_attestations``) with
   at most ``max_queued_attestations`` waiting: a flood queues, then is refused, and GetNonce or
   Watch are never stuck behind it;
6. the handler, cancelled after ``rpc_deadline_seconds`` in all (DEADLINE_EXCEEDED).

Limit refusals answer RESOURCE_EXHAUSTED with the wait in the message and in the trailing metadata
``retry-after-ms``. Latency and status codes per method go to ``kbs.nodeapi.metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, cast

import grpc

from kbs.config import LimitSettings
from kbs.errors import DatabaseUnavailable, InvalidRequest, KbsError
from kbs.nodeapi.metrics import BrokerMetrics
from kbs.nodeapi.nodeauth import REFUSED_TEXT, Metadata, NodeAuthenticator
from kbs.nodeapi.ratelimit import InflightCounter, TokenBuckets, peer_host
from kbs.tpm.ekcert import ek_hash
from kbs.tpm.objects import parse_public
from keylease.api.v1.limits import MAX_NODE_NAME, MAX_TPM_PUBLIC
from keylease.api.v1.nodeauth import AUTHENTICATED_METHODS
from keylease.text import printable

__all__ = ["EXPENSIVE_METHODS", "RETRY_AFTER_KEY", "LimitInterceptor"]

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
SERVICE_PREFIX = "/keylease.v1.NodeService/"  # other services on the server pass untouched
EXPENSIVE_METHODS = frozenset({"StartEnrollment", "FinishEnrollment", "Attest"})
BUSY_RETRY_SECONDS = 1.0
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # not in grpc-stubs

Context = grpc.aio.ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]


class _Received(NamedTuple):
    """A request message and the bytes it arrived as."""

    raw: bytes
    message: Any


class _Refused(Exception):
    """A limit refused the request (internal to this module)."""

    def __init__(
        self,
        limit: str,
        text: str,
        retry_after: float,
        code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) -> None:
        super().__init__(text)
        self.limit = limit
        self.retry_after = retry_after
        self.code = code


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _Interceptor = grpc.aio.ServerInterceptor


class LimitInterceptor(_Interceptor):
    def __init__(
        self, settings: LimitSettings, metrics: BrokerMetrics, authenticator: NodeAuthenticator
    ) -> None:
        self._s = settings
        self._metrics = metrics
        self._auth = authenticator
        self._peer_rate = _buckets(
            settings.rate_limit_peer_per_second, settings.rate_limit_peer_burst
        )
        self._node_rate = _buckets(
            settings.rate_limit_node_per_second, settings.rate_limit_node_burst
        )
        self._ek_rate = _buckets(settings.rate_limit_ek_per_second, settings.rate_limit_ek_burst)
        self._inflight = InflightCounter(settings.max_inflight_per_peer)
        self._slots = asyncio.Semaphore(settings.max_concurrent_attestations)
        self._waiting = 0

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        found: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if found is None or found.request_streaming or not _ours(handler_call_details.method):
            return found  # type: ignore[return-value]  # None: unknown method, gRPC answers it
        handler = found
        path = handler_call_details.method
        parse = handler.request_deserializer
        assert parse is not None

        def received(raw: bytes) -> _Received:
            return _Received(raw, parse(raw))

        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(path, cast(UnaryBehavior, handler.unary_unary)),
                request_deserializer=received,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(path, cast(StreamBehavior, handler.unary_stream)),
                request_deserializer=received,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, path: str, inner: UnaryBehavior) -> Callable[..., Awaitable[Any]]:
        method = path.rpartition("/")[2]

        async def behavior(requests: AsyncIterator[Any], context: Context) -> Any:
            start = time.monotonic()
            peer = peer_host(context.peer())
            try:
                self._admit_peer(peer, method)
                try:
                    async with asyncio.timeout(self._s.rpc_deadline_seconds):
                        request = await self._admit_call(path, peer, context)
                        if method in EXPENSIVE_METHODS:
                            return await self._expensive(inner, request, context)
                        return await inner(request, context)
                finally:
                    self._inflight.release(peer)
            except _Refused as exc:
                await self._refuse(context, exc, method)
            except TimeoutError:
                await self._timed_out(context, method, peer)
            finally:
                self._metrics.rpc(method, _code(context), time.monotonic() - start)

        return behavior

    def _stream(self, path: str, inner: StreamBehavior) -> Callable[..., AsyncIterator[Any]]:
        method = path.rpartition("/")[2]

        async def behavior(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            peer = peer_host(context.peer())
            try:
                self._admit_peer(peer, method)
                try:
                    async with asyncio.timeout(self._s.rpc_deadline_seconds):
                        request = await self._admit_call(path, peer, context)
                finally:
                    self._inflight.release(peer)
            except _Refused as exc:
                await self._refuse(context, exc, method)
            except TimeoutError:
                await self._timed_out(context, method, peer)
            self._metrics.watch_streams.inc()
            code = ""
            try:
                async for response in inner(request, context):
                    yield response
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"  # the client went away or the server is stopping
                raise
            finally:
                self._metrics.watch_streams.dec()
                self._metrics.rpc(method, code or _code(context), None)

        return behavior

    def _admit_peer(self, peer: str, method: str) -> None:
        """Per-peer rate, then take an in-flight slot (the caller releases it)."""
        if self._peer_rate is not None:
            wait = self._peer_rate.take(peer)
            if wait:
                rate = self._s.rate_limit_peer_per_second
                raise _Refused("peer_rate", f"too many requests from {peer} ({rate:g}/s)", wait)
        if not self._inflight.acquire(peer):
            raise _Refused(
                "peer_inflight",
                f"{self._inflight.limit} requests from {peer} are already in progress",
                BUSY_RETRY_SECONDS,
            )

    async def _admit_call(self, path: str, peer: str, context: Context) -> Any:
        """Read the request, then authenticate the node and charge its (or its EK's) budget;
        returns the request message."""
        received: _Received = await _read_one(context)
        request = received.message
        name = getattr(request, "node_name", "")
        if path in AUTHENTICATED_METHODS:
            await self._authenticate(path, peer, context, name, received.raw)
            self._admit_node(name)
        elif path.endswith("/StartEnrollment"):
            self._admit_ek(getattr(request, "ek_public", b""))
        return request

    async def _authenticate(
        self, path: str, peer: str, context: Context, name: object, raw: bytes
    ) -> None:
        try:
            ok = isinstance(name, str) and await self._auth.verify(
                path, cast(Metadata, context.invocation_metadata()), name, raw
            )
        except DatabaseUnavailable as exc:
            self._metrics.db_errors.inc()
            raise _Refused("", exc.diagnostics(), 0, grpc.StatusCode.UNAVAILABLE) from None
        except KbsError as exc:
            self._metrics.db_errors.inc()
            log.error("%s: cannot check the node's key: %s", path, exc)
            raise _Refused("", "internal error; see the broker log", 0,
                           grpc.StatusCode.INTERNAL) from None  # fmt: skip
        if not ok:
            self._auth.refused(peer, path)
            raise _Refused("unauthenticated", REFUSED_TEXT, 0, grpc.StatusCode.UNAUTHENTICATED)

    def _admit_node(self, name: str) -> None:
        """The per-node rate, charged only once the call proved it comes from node ``name``."""
        if self._node_rate is None or not name or len(name) > MAX_NODE_NAME:
            return
        wait = self._node_rate.take(name)
        if wait:
            rate = self._s.rate_limit_node_per_second
            raise _Refused("node_rate", f"too many requests for node {name!r} ({rate:g}/s)", wait)

    def _admit_ek(self, ek_public: object) -> None:
        """The per-EK rate of StartEnrollment, keyed by the EK's hash (the key, not its
        encoding). A request whose EK does not parse passes: the handler refuses it."""
        if self._ek_rate is None or not isinstance(ek_public, bytes):
            return
        if not ek_public or len(ek_public) > MAX_TPM_PUBLIC:
            return
        try:
            digest = ek_hash(parse_public(ek_public, "ek_public").key)
        except InvalidRequest:
            return
        wait = self._ek_rate.take(digest)
        if wait:
            rate = self._s.rate_limit_ek_per_second
            raise _Refused(
                "ek_rate", f"too many enrollments for EK {digest[:16]} ({rate:g}/s)", wait
            )

    async def _expensive(self, inner: UnaryBehavior, request: Any, context: Context) -> Any:
        """``inner`` in an attestation slot (the caller's timeout bounds the wait)."""
        if self._slots.locked() and self._waiting >= self._s.max_queued_attestations:
            raise _Refused(
                "busy",
                f"the broker is busy ({self._s.max_concurrent_attestations} attestations running, "
                f"{self._waiting} waiting)",
                BUSY_RETRY_SECONDS,
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await inner(request, context)
        finally:
            self._slots.release()

    async def _refuse(self, context: Context, exc: _Refused, method: str) -> NoReturn:
        if exc.limit:  # "": not a limit (the database failed)
            self._metrics.limited.labels(exc.limit).inc()
        if exc.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            await context.abort(exc.code, printable(str(exc)))
        ms = max(1, math.ceil(exc.retry_after * 1000))
        log.info("%s refused: %s; retry in %d ms", method, exc, ms)
        await context.abort(
            exc.code, f"{exc}; retry in {ms} ms", trailing_metadata=((RETRY_AFTER_KEY, str(ms)),)
        )
        raise AssertionError("unreachable: context.abort raises")

    async def _timed_out(self, context: Context, method: str, peer: str) -> NoReturn:
        self._metrics.limited.labels("deadline").inc()
        limit = self._s.rpc_deadline_seconds
        log.warning("%s from %s cancelled: not done within %g s", method, peer, limit)
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the request was not received and handled within the broker's {limit:g} s deadline",
        )
        raise AssertionError("unreachable: context.abort raises")


def _ours(method: str) -> bool:
    return method.startswith(SERVICE_PREFIX)


def _buckets(rate: float, burst: int) -> TokenBuckets | None:
    return TokenBuckets(rate, burst) if rate > 0 else None


async def _read_one(context: Context) -> Any:
    """The single request message of a unary call."""
    request = await context.read()
    if request is _EOF:
        raise _Refused(
            "empty", "the call carried no request message", 0, grpc.StatusCode.INVALID_ARGUMENT
        )
    return request


def _code(context: Context) -> str:
    code: object = context.code()  # None until a handler sets one
    if isinstance(code, grpc.StatusCode):
        return code.name
    if context.cancelled():
        return "CANCELLED"
    return "OK" if code in (None, 0) else str(code)

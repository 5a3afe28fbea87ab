"""Admission control for the node-facing listener: a gRPC server interceptor.

It covers every service on the listener: ``keylease.v1.NodeService`` and ``grpc.health.v1.Health``
(``ADMITTED_SERVICES``). The client's address is the real one even behind the connection front
(``kbs.nodeapi.front``), which relays each connection from a loopback port: ``PeerMap`` resolves
it. Every request passes, in order:

1. **per-peer rate** (token bucket per client IP address) and **per-peer in-flight** cap
   (unfinished requests from that address); a stream also takes a **per-peer stream slot** of its
   kind for its whole life: ``max_watch_streams_per_peer`` node Watch streams (one per agent: a
   fleet behind one NAT address needs one each) and ``max_health_watches_per_peer`` health Watch
   streams (at most ``MAX_HEALTH_WATCHES`` in all), so one client cannot hold the server's
   concurrency with streams;
2. **receiving the request within the deadline**: unary methods are served as client-streaming
   handlers so that the request message is read here, under ``rpc_deadline_seconds``. A client
   that opens calls and never sends (or sends slowly) is cut off instead of holding the server's
   concurrency slots;
   The request is kept as received too: its bytes are what the node's MAC covers;
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
``retry-after-ms``, and are logged at most once per limit every 10 s (a flood is one line, not
thousands). Latency and status codes per method go to ``kbs.nodeapi.metrics`` (health methods as
``Health.Check`` and ``Health.Watch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc

from kbs.config import LimitSettings
from kbs.nodeapi.callers import CallerCheck, Context, Received, Refused
from kbs.nodeapi.metrics import BrokerMetrics
from kbs.nodeapi.nodeauth import NodeAuthenticator
from kbs.nodeapi.ratelimit import InflightCounter, PeerMap, TokenBuckets
from kbs.nodeapi.refusals import ThrottledLog
from keylease.text import printable

__all__ = [
    "ADMITTED_SERVICES",
    "EXPENSIVE_METHODS",
    "MAX_HEALTH_WATCHES",
    "RETRY_AFTER_KEY",
    "LimitInterceptor",
]

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
SERVICE_PREFIX = "/keylease.v1.NodeService/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
ADMITTED_SERVICES = (SERVICE_PREFIX, HEALTH_PREFIX)  # every service on the node listener
EXPENSIVE_METHODS = frozenset({"StartEnrollment", "FinishEnrollment", "Attest"})
MAX_HEALTH_WATCHES = 1024  # health Watch streams open at once, from all peers
BUSY_RETRY_SECONDS = 1.0
STREAM_RETRY_SECONDS = 30.0

UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]
WriterBehavior = Callable[[Any, Context], Awaitable[None]]  # a stream written with context.write


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _Interceptor = grpc.aio.ServerInterceptor


class LimitInterceptor(_Interceptor):
    def __init__(
        self,
        settings: LimitSettings,
        metrics: BrokerMetrics,
        authenticator: NodeAuthenticator,
        peers: PeerMap | None = None,
    ) -> None:
        self._s = settings
        self._metrics = metrics
        self._callers = CallerCheck(settings, metrics, authenticator)
        self._peers = peers if peers is not None else PeerMap()
        self._streams = {
            "Watch": InflightCounter(settings.max_watch_streams_per_peer),
            "Health.Watch": InflightCounter(
                settings.max_health_watches_per_peer, MAX_HEALTH_WATCHES
            ),
        }
        self._throttled = ThrottledLog(log)
        self._peer_rate = _buckets(
            settings.rate_limit_peer_per_second, settings.rate_limit_peer_burst
        )
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
        method = _label(path)
        parse = handler.request_deserializer
        assert parse is not None

        def received(raw: bytes) -> Received:
            return Received(raw, parse(raw))

        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(path, cast(UnaryBehavior, handler.unary_unary)),
                request_deserializer=received,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and method in self._streams:
            inner = handler.unary_stream
            return grpc.stream_stream_rpc_method_handler(
                self._writer_stream(path, cast(WriterBehavior, inner))
                if inspect.iscoroutinefunction(inner)
                else self._stream(path, cast(StreamBehavior, inner)),
                request_deserializer=received,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, path: str, inner: UnaryBehavior) -> Callable[..., Awaitable[Any]]:
        method = _label(path)

        async def behavior(requests: AsyncIterator[Any], context: Context) -> Any:
            start = time.monotonic()
            peer = self._peers.host(context.peer())
            try:
                self._admit_peer(peer, method)
                try:
                    async with asyncio.timeout(self._s.rpc_deadline_seconds):
                        request = await self._callers.admit(path, peer, context)
                        if method in EXPENSIVE_METHODS:
                            return await self._expensive(inner, request, context)
                        return await inner(request, context)
                finally:
                    self._inflight.release(peer)
            except Refused as exc:
                await self._refuse(context, exc, method)
            except TimeoutError:
                await self._timed_out(context, method, peer)
            finally:
                self._metrics.rpc(method, _code(context), time.monotonic() - start)

        return behavior

    def _stream(self, path: str, inner: StreamBehavior) -> Callable[..., AsyncIterator[Any]]:
        async def behavior(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async with self._held_stream(path, context) as request:
                async for response in inner(request, context):
                    yield response

        return behavior

    def _writer_stream(self, path: str, inner: WriterBehavior) -> Callable[..., Awaitable[None]]:
        """``_stream`` for a handler that writes with ``context.write`` (grpc.health.v1 Watch)."""

        async def behavior(requests: AsyncIterator[Any], context: Context) -> None:
            async with self._held_stream(path, context) as request:
                await inner(request, context)

        return behavior

    @contextlib.asynccontextmanager
    async def _held_stream(self, path: str, context: Context) -> AsyncIterator[Any]:
        """The admitted stream's request, its slot held (and counted) until the stream ends."""
        method = _label(path)
        peer = self._peers.host(context.peer())
        request = await self._open_stream(path, peer, context)
        gauge = self._stream_gauge(method)
        gauge.inc()
        code = ""
        try:
            yield request
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"  # the client went away or the server is stopping
            raise
        finally:
            self._streams[method].release(peer)
            gauge.dec()
            self._metrics.rpc(method, code or _code(context), None)

    async def _open_stream(self, path: str, peer: str, context: Context) -> Any:
        """Admit a stream: per-peer rate and in-flight while its request is read, a stream slot
        of its kind for its whole life (the caller releases it once the stream ends); returns
        the request. Refusals abort the call."""
        method = _label(path)
        streams = self._streams[method]
        try:
            self._admit_peer(peer, method)
            try:
                if not streams.acquire(peer):
                    raise Refused(
                        "peer_streams", self._streams_full(method, peer), STREAM_RETRY_SECONDS
                    )
                try:
                    async with asyncio.timeout(self._s.rpc_deadline_seconds):
                        request = await self._callers.admit(path, peer, context)
                except BaseException:
                    streams.release(peer)
                    raise
            finally:
                self._inflight.release(peer)
        except Refused as exc:
            await self._refuse(context, exc, method)
        except TimeoutError:
            await self._timed_out(context, method, peer)
        return request

    def _streams_full(self, method: str, peer: str) -> str:
        streams = self._streams[method]
        if streams.count(peer) >= streams.limit:
            return f"{streams.limit} {method} streams from {peer} are already open"
        return f"the broker has {streams.total} {method} streams open, its limit"

    def _stream_gauge(self, method: str) -> Any:
        if method == "Watch":
            return self._metrics.watch_streams
        return self._metrics.health_watch_streams

    def _admit_peer(self, peer: str, method: str) -> None:
        """Per-peer rate, then take an in-flight slot (the caller releases it)."""
        if self._peer_rate is not None:
            wait = self._peer_rate.take(peer)
            if wait:
                rate = self._s.rate_limit_peer_per_second
                raise Refused("peer_rate", f"too many requests from {peer} ({rate:g}/s)", wait)
        if not self._inflight.acquire(peer):
            raise Refused(
                "peer_inflight",
                f"{self._inflight.limit} requests from {peer} are already in progress",
                BUSY_RETRY_SECONDS,
            )

    async def _expensive(self, inner: UnaryBehavior, request: Any, context: Context) -> Any:
        """``inner`` in an attestation slot (the caller's timeout bounds the wait)."""
        if self._slots.locked() and self._waiting >= self._s.max_queued_attestations:
            raise Refused(
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

    async def _refuse(self, context: Context, exc: Refused, method: str) -> NoReturn:
        if exc.limit:  # "": not a limit (the database failed)
            self._metrics.limited.labels(exc.limit).inc()
        if exc.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            await context.abort(exc.code, printable(str(exc)))
        ms = max(1, math.ceil(exc.retry_after * 1000))
        self._throttled.log(
            logging.INFO, exc.limit, "%s refused: %s; retry in %d ms", method, exc, ms
        )
        await context.abort(
            exc.code, f"{exc}; retry in {ms} ms", trailing_metadata=((RETRY_AFTER_KEY, str(ms)),)
        )
        raise AssertionError("unreachable: context.abort raises")

    async def _timed_out(self, context: Context, method: str, peer: str) -> NoReturn:
        self._metrics.limited.labels("deadline").inc()
        limit = self._s.rpc_deadline_seconds
        self._throttled.log(
            logging.WARNING,
            "deadline",
            "%s from %s cancelled: not done within %g s",
            method,
            peer,
            limit,
        )
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the request was not received and handled within the broker's {limit:g} s deadline",
        )
        raise AssertionError("unreachable: context.abort raises")


def _ours(method: str) -> bool:
    return method.startswith(ADMITTED_SERVICES)


def _label(method: str) -> str:
    """The method's name in metrics and limits: ``Attest``, ``Watch``; ``Health.Check``."""
    name = method.rpartition("/")[2]
    return f"Health.{name}" if method.startswith(HEALTH_PREFIX) else name


def _buckets(rate: float, burst: int) -> TokenBuckets | None:
    return TokenBuckets(rate, burst) if rate > 0 else None


def _code(context: Context) -> str:
    code: object = context.code()  # None until a handler sets one
    if isinstance(code, grpc.StatusCode):
        return code.name
    if context.cancelled():
        return "CANCELLED"
    return "OK" if code in (None, 0) else str(code)

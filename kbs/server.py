"""The broker's server lifecycle: start-up, serve, bounded graceful shutdown.

One process serves the node API with its admission limits, health and change feed
(``kbs.nodeapi``), the operators' admin API (``kbs.admin.service``) and the metrics endpoint,
all from one ``BrokerContext`` (config, store, EK roots, master key) loaded at start.

SIGTERM/SIGINT start a graceful stop (in-flight RPCs get ``SHUTDOWN_GRACE`` seconds); a second
signal stops at once. The change feed behind the Watch streams starts with the server and is
stopped first, which ends every Watch stream at once, so open streams never hold the stop.

Start-up waits up to ``DATABASE_WAIT`` seconds for a database that cannot be reached yet (logging
each retry), then exits with the error (systemd's ``Restart=on-failure`` tries again). Once
serving, a database outage only turns the health service NOT_SERVING; requests fail UNAVAILABLE
until the database is back.

Keepalive: the server pings idle connections every ``KEEPALIVE_MS`` (so a dead agent's watch
stream is freed) and accepts client pings every 5 s or slower (the agent pings every 10 s).

Connections: the ``listen`` address is served by the connection front (``kbs.nodeapi.front``:
per-address and total connection caps, a deadline for the first byte) which relays to gRPC on a
loopback port; gRPC ends TLS handshakes slower than ``handshake_timeout_seconds`` and closes
connections without an RPC for ``idle_timeout_seconds``. ``max_connections_per_address = 0``
puts gRPC on ``listen`` directly instead (no per-address cap; for a broker behind a proxy that
enforces its own).

Audit retention runs here too: rows older than ``audit_retention_days`` are deleted every hour
(``kbs.retention``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import grpc

from kbs.admin.service import AdminServer, start_admin_server
from kbs.config import KbsConfig
from kbs.context import BrokerContext
from kbs.errors import ConfigError, DatabaseUnavailable, KbsError
from kbs.nodeapi.admission import MAX_HEALTH_WATCHES, LimitInterceptor
from kbs.nodeapi.changefeed import MAX_WATCHERS, ChangeFeed
from kbs.nodeapi.front import BACKEND_HOST, ConnectionFront, FrontLimits, fd_limit
from kbs.nodeapi.health import HealthMonitor
from kbs.nodeapi.metrics import BrokerMetrics, MetricsServer
from kbs.nodeapi.nodeauth import NodeAuthenticator
from kbs.nodeapi.ratelimit import PeerMap
from kbs.nodeapi.service import NodeService
from kbs.nodekeys import stored_node_key
from kbs.retention import prune_audit_forever
from kbs.tls import load_credentials
from keylease.api.v1 import keylease_pb2_grpc as pb_grpc
from keylease.api.v1.limits import MAX_MESSAGE

__all__ = ["SHUTDOWN_GRACE", "RunningServer", "serve", "start_server"]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
MAX_UNARY_RPCS = 256  # plus one slot per watch stream, which the change feed limits itself
KEEPALIVE_MS = 30_000
DATABASE_WAIT = 60.0  # seconds a starting broker waits for an unreachable database


class RunningServer:
    """A started broker: ``port`` is the bound port (useful with ``listen = "host:0"``)."""

    health: HealthMonitor | None = None  # grpc.health.v1 on the node listener
    front: ConnectionFront | None = None  # None: gRPC listens on `listen` itself
    retention: asyncio.Task[None] | None = None  # audit retention (None: keep every row)

    def __init__(
        self,
        server: grpc.aio.Server,
        ctx: BrokerContext,
        port: int,
        feed: ChangeFeed,
        metrics: BrokerMetrics | None = None,
        metrics_server: MetricsServer | None = None,
    ) -> None:
        self.server = server
        self.ctx = ctx
        self.port = port
        self.feed = feed
        self.admin_server: AdminServer | None = None  # None: `admin_listen = ""`
        self.metrics = metrics or BrokerMetrics()
        self.metrics_server = metrics_server  # None: `metrics_listen = ""`

    async def stop(self, grace: float | None = SHUTDOWN_GRACE) -> None:
        if self.front is not None:
            self.front.stop_accepting()
        if self.retention is not None:
            self.retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.retention
        if self.health is not None:
            await self.health.stop()
        if self.admin_server is not None:
            await self.admin_server.stop(grace)
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        await self.feed.stop()
        await self.server.stop(grace)
        if self.front is not None:
            await self.front.close()
        self.ctx.store.close()


async def _load_context(cfg: KbsConfig, wait: float) -> BrokerContext:
    """``BrokerContext.load``, retrying for up to ``wait`` seconds while the database cannot be
    reached (a broker started before its database server, e.g. at boot); then the error."""
    deadline = time.monotonic() + wait
    delay = 1.0
    while True:
        try:
            return await asyncio.to_thread(BrokerContext.load, cfg)
        except DatabaseUnavailable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            pause = min(delay, left)
            log.warning("%s; starting anyway once it answers: retrying in %.0f s", exc, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, 10.0)


async def start_server(
    cfg: KbsConfig, ctx: BrokerContext | None = None, database_wait: float = DATABASE_WAIT
) -> RunningServer:
    ctx = ctx or await _load_context(cfg, database_wait)
    tls = load_credentials(cfg.tls_cert, cfg.tls_key)
    metrics = BrokerMetrics()
    store, master = ctx.store, ctx.master_key
    auth = NodeAuthenticator(
        lambda name: stored_node_key(store, master, name), inline=store.is_sqlite
    )
    peers = PeerMap()  # the client behind each connection the front relays
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            *_connection_options(cfg),
        ],
        maximum_concurrent_rpcs=MAX_UNARY_RPCS + MAX_WATCHERS + MAX_HEALTH_WATCHES,
        interceptors=[LimitInterceptor(cfg.limits, metrics, auth, peers)],
    )
    feed = ChangeFeed(ctx.store)
    feed.listen(lambda change: auth.forget(change.node) if change.node else None)
    service = NodeService(ctx, feed, metrics=metrics, enrolled=auth.forget)
    pb_grpc.add_NodeServiceServicer_to_server(service, server)
    health = HealthMonitor(ctx.store)
    health.add_to_server(server)
    host = cfg.listen_host
    fronted = cfg.limits.max_connections_per_address > 0
    address = (
        f"{BACKEND_HOST}:0"
        if fronted
        else f"[{host}]:{cfg.listen_port}"
        if ":" in host
        else f"{host}:{cfg.listen_port}"
    )
    creds = grpc.ssl_server_credentials([(tls.key_pem, tls.chain_pem)])
    try:
        port = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        ctx.store.close()
        raise ConfigError(f"cannot listen on {address}: {exc}; is another broker running?") from exc
    try:
        await feed.start()
    except KbsError:
        ctx.store.close()
        raise
    await health.start()
    await server.start()
    running = RunningServer(server, ctx, port, feed, metrics)
    running.health = health
    if fronted:
        front = ConnectionFront(FrontLimits.sized(cfg.limits, fd_limit()), port, metrics, peers)
        try:
            running.port = await front.start(host, cfg.listen_port)
        except KbsError:
            await running.stop(0)
            raise
        running.front = front
        log.info(
            "connections: at most %d (file descriptor limit %d), %d per client address",
            front.limits.max_connections,
            fd_limit(),
            front.limits.per_address,
        )
    log.info(
        "keylease-kbs serving on %s:%d (enrollment=%s)", host, running.port, cfg.enrollment.value
    )
    if cfg.audit_retention_days:
        running.retention = asyncio.create_task(
            prune_audit_forever(ctx.store, cfg.audit_retention_days, running.metrics, ctx.clock),
            name="keylease-audit-retention",
        )
    if cfg.metrics_listen is not None:
        try:
            running.metrics_server = await MetricsServer.start(
                metrics, *cfg.metrics_listen, ctx.store
            )
        except KbsError:
            await running.stop(0)
            raise
        log.info(
            "metrics on http://%s:%d/metrics", cfg.metrics_listen[0], running.metrics_server.port
        )
    try:
        running.admin_server = await start_admin_server(cfg, ctx)
    except KbsError:
        await running.stop(0)
        raise
    return running


def _connection_options(cfg: KbsConfig) -> list[tuple[str, int]]:
    """gRPC's own connection timeouts: the TLS handshake and connections without RPCs."""
    return [
        ("grpc.server_handshake_timeout_ms", int(cfg.limits.handshake_timeout_seconds * 1000)),
        ("grpc.max_connection_idle_ms", int(cfg.limits.idle_timeout_seconds * 1000)),
    ]


async def _serve(cfg: KbsConfig, ready_file: Path | None) -> None:
    running = await start_server(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("stopping (in-flight requests get %.0f s)", SHUTDOWN_GRACE)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(f"{cfg.listen_host}:{running.port}\n")
        tmp.replace(ready_file)
    await stop.wait()
    await running.stop()
    log.info("stopped")


def serve(cfg: KbsConfig, ready_file: Path | None = None) -> None:
    """Run the broker until SIGTERM/SIGINT. ``ready_file`` receives "HOST:PORT" once listening."""
    asyncio.run(_serve(cfg, ready_file))

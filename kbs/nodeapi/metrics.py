"""Prometheus metrics for one broker, served over HTTP on their own port (``metrics_listen``).

Each broker has its own ``CollectorRegistry`` (never the process-wide default), so several
brokers can run in one process (tests). Every label has a bounded set of values: RPC method
names, status codes, result words, error class names, node states, and key names (which only
operators create).

- ``keylease_attestations_total{result, reason}``: released, pending, denied or error; reason is
  the error class (``PolicyDenied``, ``NonceUnknown``, ...) or ``none``
- ``keylease_enrollments_total{result, reason}``: ok, refused or error, likewise
- ``keylease_releases_total{key}``: keys released (one per key per release)
- ``keylease_rpc_duration_seconds{method}``: histogram of node-facing unary RPC latency
- ``keylease_rpcs_total{method, code}``: node-facing RPCs by gRPC status code
- ``keylease_requests_limited_total{limit}``: requests refused by a limit
  (``kbs.nodeapi.admission``)
- ``keylease_nodes{state}``: nodes per state, refreshed every ``NODE_REFRESH_SECONDS``
- ``keylease_db_errors_total``: database errors (StoreError) met by the service
- ``keylease_watch_streams``: Watch streams open now
- ``keylease_health_watch_streams``: grpc.health.v1 Watch streams open now
- ``keylease_connections``: client connections open through the connection front
- ``keylease_connections_refused_total{reason}``: connections closed by the front:
  ``address_limit``, ``total_limit``, ``no_tls`` (no first byte within the handshake timeout),
  ``backend`` (the gRPC listener could not be reached)
- ``keylease_unproven_refusals_total{event, reason}``: refusals that prove no node identity,
  counted here instead of written to the audit log (``kbs.nodeapi.refusals``)
- ``keylease_audit_rows_pruned_total``: audit rows deleted after ``audit_retention_days``
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kbs.errors import ConfigError, KbsError, StoreError
from kbs.model import NodeState
from kbs.store import Store

__all__ = [
    "NODE_REFRESH_SECONDS",
    "BrokerMetrics",
    "MetricsServer",
    "refresh_nodes",
    "refresh_nodes_forever",
]

log = logging.getLogger(__name__)

NODE_REFRESH_SECONDS = 15.0
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class BrokerMetrics:
    """The broker's metrics in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.attestations = Counter(
            "keylease_attestations",
            "Attestations by result and reason (the error class)",
            ["result", "reason"],
            registry=r,
        )
        self.enrollments = Counter(
            "keylease_enrollments",
            "Enrollment steps by result and reason (the error class)",
            ["result", "reason"],
            registry=r,
        )
        self.releases = Counter(
            "keylease_releases", "Keys released to nodes, by key name", ["key"], registry=r
        )
        self.rpc_seconds = Histogram(
            "keylease_rpc_duration_seconds",
            "Node-facing unary RPC latency",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rpcs = Counter(
            "keylease_rpcs", "Node-facing RPCs by status code", ["method", "code"], registry=r
        )
        self.limited = Counter(
            "keylease_requests_limited", "Requests refused by a limit", ["limit"], registry=r
        )
        self.nodes = Gauge("keylease_nodes", "Nodes per state", ["state"], registry=r)
        self.db_errors = Counter("keylease_db_errors", "Database errors (StoreError)", registry=r)
        self.watch_streams = Gauge("keylease_watch_streams", "Watch streams open", registry=r)
        self.health_watch_streams = Gauge(
            "keylease_health_watch_streams", "grpc.health.v1 Watch streams open", registry=r
        )
        self.connections = Gauge(
            "keylease_connections", "Client connections open through the front", registry=r
        )
        self.connections_refused = Counter(
            "keylease_connections_refused",
            "Connections closed by the connection front, by reason",
            ["reason"],
            registry=r,
        )
        self.unproven_refusals = Counter(
            "keylease_unproven_refusals",
            "Refusals that prove no node identity (not in the audit log), by step and error class",
            ["event", "reason"],
            registry=r,
        )
        self.audit_pruned = Counter(
            "keylease_audit_rows_pruned",
            "Audit rows deleted after the retention period",
            registry=r,
        )

    def outcome(self, event: str, result: str, reason: str = "none") -> None:
        """Count an enrollment or attestation step (``event`` as in the audit log)."""
        if event == "attest":
            self.attestations.labels(result, reason).inc()
        elif event == "enroll":
            self.enrollments.labels(result, reason).inc()

    def failed(self, event: str, result: str, exc: KbsError) -> None:
        """Count a refused request: its step's outcome and, for StoreError, a DB error."""
        if isinstance(exc, StoreError):
            self.db_errors.inc()
        self.outcome(event, result, type(exc).__name__)

    def released(self, keys: tuple[tuple[str, int], ...]) -> None:
        for name in sorted({name for name, _version in keys}):  # once per key, any versions
            self.releases.labels(name).inc()

    def rpc(self, method: str, code: str, seconds: float | None) -> None:
        self.rpcs.labels(method, code).inc()
        if seconds is not None:
            self.rpc_seconds.labels(method).observe(seconds)

    def set_nodes(self, counts: dict[NodeState, int]) -> None:
        for state in NodeState:
            self.nodes.labels(state.value).set(counts.get(state, 0))


class MetricsServer:
    """``/metrics`` over HTTP in a thread of its own, and the task refreshing ``keylease_nodes``."""

    def __init__(
        self, server: WSGIServer, thread: threading.Thread, task: asyncio.Task[None]
    ) -> None:
        self._server = server
        self._thread = thread
        self._task = task
        self.host: str = str(server.server_address[0])
        self.port: int = server.server_port

    @classmethod
    async def start(
        cls, metrics: BrokerMetrics, host: str, port: int, store: Store
    ) -> MetricsServer:
        """Listen on ``host:port`` (port 0 picks one); raises ConfigError if that fails."""
        try:
            server, thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror}; change `metrics_listen` "
                'in kbs.toml (or set it to "" to turn metrics off)'
            ) from None
        await refresh_nodes(metrics, store)
        task = asyncio.create_task(refresh_nodes_forever(metrics, store), name="metrics-nodes")
        return cls(server, thread, task)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await asyncio.to_thread(self._close_http)

    def _close_http(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


async def refresh_nodes(metrics: BrokerMetrics, store: Store) -> None:
    """Set ``keylease_nodes`` from the database (a failure counts as a DB error)."""
    try:
        metrics.set_nodes(await asyncio.to_thread(store.count_nodes_by_state))
    except StoreError as exc:
        metrics.db_errors.inc()
        log.warning("metrics: cannot count nodes: %s", exc)


async def refresh_nodes_forever(
    metrics: BrokerMetrics, store: Store, interval: float = NODE_REFRESH_SECONDS
) -> None:
    """``refresh_nodes`` every ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        await refresh_nodes(metrics, store)

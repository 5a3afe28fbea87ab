"""Prometheus metrics of a real broker, scraped over HTTP after real attestations (swtpm agents):
attestations by result and reason, releases by key (once per key, however many versions),
latency per RPC, nodes by state, watch streams; one registry per broker; the endpoint's own
errors."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.broker import BrokerClient
from harness.broker import Broker
from harness.keys import write_key
from harness.netops import Samples, metrics_port, scrape
from harness.nodes import Node
from harness.operator import grant_node, ok
from kbs.errors import ConfigError, PolicyDenied, StoreError
from kbs.model import NodeState
from kbs.nodeapi.metrics import BrokerMetrics, MetricsServer, refresh_nodes_forever
from kbs.store import Store

NodeFactory = Callable[..., Node]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_after_real_attestations(
    broker: Broker, make_node: NodeFactory, tmp_path: Path
) -> None:
    port = metrics_port(broker)
    node = make_node("worker-1")
    assert node.attest().returncode == 3  # enrolled, pending approval
    grant_node(broker, node, write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1())))
    ok(node.attest())
    rotated = write_key(tmp_path / "k2.pem", ec.generate_private_key(ec.SECP256R1()))
    ok(broker.kbs("key", "rotate", "prod-key", "--private-key", str(rotated)))
    ok(node.attest())  # two versions of one key: one release of that key
    ok(broker.kbs("node", "revoke", node.name))
    assert node.attest().returncode == 4

    m = scrape(port)
    attest = "keylease_attestations_total"
    assert value(m, attest, result="pending", reason="none") == 1
    assert value(m, attest, result="released", reason="none") == 2
    assert value(m, attest, result="denied", reason="NodeRevoked") == 1
    assert value(m, "keylease_enrollments_total", result="ok", reason="none") == 1
    assert value(m, "keylease_releases_total", key="prod-key") == 2
    assert value(m, "keylease_rpc_duration_seconds_count", method="Attest") == 4
    assert value(m, "keylease_rpc_duration_seconds_count", method="GetNonce") == 4
    assert value(m, "keylease_rpc_duration_seconds_count", method="StartEnrollment") == 1
    assert value(m, "keylease_rpc_duration_seconds_sum", method="Attest") > 0
    assert value(m, "keylease_rpc_duration_seconds_bucket", method="Attest", le="+Inf") == 4
    assert value(m, "keylease_rpcs_total", method="Attest", code="OK") == 3
    assert value(m, "keylease_rpcs_total", method="Attest", code="PERMISSION_DENIED") == 1
    assert value(m, "keylease_db_errors_total") == 0

    # Node states are read from the database at start and every 15 s.
    broker.restart()
    m = scrape(metrics_port(broker))
    assert value(m, "keylease_nodes", state="revoked") == 1
    assert value(m, "keylease_nodes", state="approved") == 0
    assert value(m, "keylease_nodes", state="pending") == 0


def test_watch_streams_gauge(broker: Broker, make_node: NodeFactory) -> None:
    node = make_node("watcher")
    assert node.attest().returncode == 3
    port = metrics_port(broker)
    with BrokerClient(node.config()) as client:
        stream = client.watch(node.identity())
        events = iter(stream)
        next(events)  # the first heartbeat: the stream is open
        assert value(scrape(port), "keylease_watch_streams") == 1
        stream.cancel()
        deadline = time.monotonic() + 10
        while value(scrape(port), "keylease_watch_streams") != 0:
            assert time.monotonic() < deadline, "the watch gauge did not go back to 0"
            time.sleep(0.05)
    assert value(scrape(port), "keylease_rpcs_total", method="Watch", code="CANCELLED") == 1


def test_registries_are_per_broker_and_labels_bounded() -> None:
    first, second = BrokerMetrics(), BrokerMetrics()  # the default registry would refuse this
    first.failed("attest", "denied", PolicyDenied("PCR 7 differs", [7]))
    first.failed("nonce", "error", StoreError("database is locked"))
    first.released((("prod-key", 2), ("other", 1)))
    assert (
        first.registry.get_sample_value(
            "keylease_attestations_total", {"result": "denied", "reason": "PolicyDenied"}
        )
        == 1
    )
    assert first.registry.get_sample_value("keylease_db_errors_total") == 1
    assert first.registry.get_sample_value("keylease_releases_total", {"key": "prod-key"}) == 1
    assert second.registry.get_sample_value("keylease_db_errors_total") == 0


async def _serve_and_scrape(store: Store, port: int) -> Samples:
    metrics = BrokerMetrics()
    server = await MetricsServer.start(metrics, "127.0.0.1", port, store)
    try:
        return scrape(server.port)
    finally:
        await server.stop()


def test_node_gauge_and_endpoint_errors(tmp_path: Path) -> None:
    import asyncio

    store = Store.open(tmp_path / "kbs.db")
    try:
        m = asyncio.run(_serve_and_scrape(store, 0))
        assert value(m, "keylease_nodes", state="pending") == 0
        assert ("keylease_nodes", frozenset({("state", "approved")})) in m

        with socket.create_server(("127.0.0.1", 0)) as taken:
            busy = taken.getsockname()[1]
            with pytest.raises(ConfigError, match="metrics_listen"):
                asyncio.run(_serve_and_scrape(store, busy))

        metrics = BrokerMetrics()

        async def refresh_once() -> None:
            task = asyncio.create_task(refresh_nodes_forever(metrics, store, interval=0.01))
            await asyncio.sleep(0.1)
            task.cancel()

        asyncio.run(refresh_once())
        for state in NodeState:
            assert metrics.registry.get_sample_value("keylease_nodes", {"state": state.value}) == 0
    finally:
        store.close()

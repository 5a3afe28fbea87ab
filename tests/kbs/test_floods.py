"""The broker stays up for agents under abuse (issue 10, attacks 3 and 4): floods from one client
address against a real broker subprocess, while a well-behaved agent (real swtpm,
``keylease-agent attest --once``) attests from another address, 127.0.0.2, within its deadline.

- attack 3: 16,640 grpc.health.v1 Health/Watch streams from one client used to take every slot
  of the server's concurrent-RPC limit ("Concurrent RPC limit exceeded" for every agent); now a
  client keeps ``max_health_watches_per_peer`` of them and the rest are refused at once.
- attack 4: 1,300 TCP connections that never start TLS used to exhaust a broker with 1,024 file
  descriptors; now the connection front holds at most half of its connections for one address,
  resets the rest at once and closes the silent ones after ``handshake_timeout_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from harness.broker import Broker, CliResult
from harness.floods import HealthWatchFlood, IdleConnectionFlood
from harness.keys import write_key
from harness.netops import SourceProxy, metrics_port, scrape
from harness.nodes import Node
from harness.operator import grant_node

NodeFactory = Callable[..., Node]
AGENT_DEADLINE = 10.0  # the agent's rpc_timeout_seconds (its default)


@pytest.fixture
def far_node(broker: Broker, make_node: NodeFactory, tmp_path: Path) -> Iterator[Node]:
    """A granted node whose agent reaches the broker from 127.0.0.2, with its key installed."""
    proxy = SourceProxy(broker.address, "127.0.0.2")
    node = make_node("worker-far")
    node.via = proxy.address
    try:
        first = node.attest()
        assert first.returncode == 3, first  # pending approval
        grant_node(
            broker, node, write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()))
        )
        granted = node.attest()
        assert granted.returncode == 0, granted
        yield node
    finally:
        proxy.close()


def timed_attest(node: Node) -> tuple[CliResult, float]:
    start = time.monotonic()
    result = node.attest()
    return result, time.monotonic() - start


def limited(port: int, metric: str, **labels: str) -> float:
    return scrape(port).get((metric, frozenset(labels.items())), 0.0)


def test_health_watch_flood_from_one_client_leaves_agents_served(
    broker: Broker, make_node: NodeFactory, tmp_path: Path
) -> None:
    broker.restart(metrics_listen="127.0.0.1:0")
    port = metrics_port(broker)
    proxy = SourceProxy(broker.address, "127.0.0.2")
    node = make_node("worker-far")
    node.via = proxy.address
    flood = HealthWatchFlood(broker.address, broker.ca, streams=16_640)
    try:
        assert node.attest().returncode == 3
        grant_node(
            broker, node, write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()))
        )
        flood.start()
        held = flood.outcomes["open"]
        result, took = timed_attest(node)  # while the flood holds what it could get
        still_held = scrape(port)[("keylease_health_watch_streams", frozenset())]
    finally:
        flood.stop()
        proxy.close()
    assert result.returncode == 0, result
    assert took < AGENT_DEADLINE, took
    assert node.key_file("prod-key").exists()
    # one client keeps max_health_watches_per_peer (4) streams; every other call was refused
    assert held == 4, flood.outcomes
    assert still_held == 4
    assert flood.outcomes["RESOURCE_EXHAUSTED"] == 16_640 - 4, flood.outcomes
    assert limited(port, "keylease_requests_limited_total", limit="peer_streams") > 0
    # the log says so once per 10 s, not 16,636 times
    assert 1 <= broker.log().count("Health.Watch refused") <= 10


def test_idle_connections_beyond_the_fd_limit_leave_agents_served(
    broker: Broker, far_node: Node
) -> None:
    broker.nofile = 1024  # what the broker had when 1,300 idle connections took it down
    broker.restart(metrics_listen="127.0.0.1:0", handshake_timeout_seconds=2)
    assert "connections: at most 256 (file descriptor limit 1024), 128 per client address" in (
        broker.log()
    )
    port = metrics_port(broker)
    flood = IdleConnectionFlood(broker.address, count=1_300).start()
    try:
        time.sleep(0.5)
        result, took = timed_attest(far_node)
        time.sleep(3)  # past the handshake timeout: the silent ones were closed and replaced
        again, took_again = timed_attest(far_node)
        opened, closed = flood.opened, flood.closed_by_peer
    finally:
        flood.stop()
    assert result.returncode == 0, result
    assert again.returncode == 0, again
    assert max(took, took_again) < AGENT_DEADLINE, (took, took_again)
    assert opened >= 1_300
    assert closed >= 1_300 - 128  # reset at once, or closed for saying nothing
    assert limited(port, "keylease_connections_refused_total", reason="address_limit") >= 1_172
    assert limited(port, "keylease_connections_refused_total", reason="no_tls") >= 1
    log = broker.log()
    assert "Too many open files" not in log
    assert "closed: 128 connections from 127.0.0.1 are open" in log
    assert log.count("connections from 127.0.0.1 are open") <= 10  # throttled

"""Revocation push and key rotation against a real broker subprocess: the Watch stream delivers
REVOKED and CHANGED to the nodes they concern (and only to them), is opened only by the node
itself (unknown, malformed and unproven names alike are UNAUTHENTICATED), never holds up the
broker's shutdown, and a rotated key reaches the node's key dirs beside the older version until
that is retired."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.blobs import NodeIdentity
from agent.broker import BrokerClient, WatchEvent, WatchKind, WatchStream
from agent.errors import AgentError, BrokerUnreachable, NotAuthenticated
from harness.broker import Broker
from harness.keys import write_key
from harness.nodes import Node
from harness.operator import grant_node, ok
from kbs.config import load_config
from kbs.errors import FeedClosed
from kbs.masterkey import master_keyring
from kbs.model import ChangeKind, NodeState
from kbs.nodeapi.changefeed import MAX_PER_NODE, QUEUE_SIZE, ChangeFeed, Notice
from kbs.nodekeys import seal_new_node_key
from kbs.server import SHUTDOWN_GRACE
from kbs.store import Store
from keylease.api.v1.nodeauth import node_key
from keylease.secret import Secret

NodeFactory = Callable[..., Node]
Item = WatchEvent | AgentError | None  # None: the stream ended cleanly


class Watcher:
    """One Watch stream read by a background thread into a queue."""

    def __init__(self, client: BrokerClient, node: Node | NodeIdentity) -> None:
        identity = node.identity() if isinstance(node, Node) else node
        self.stream: WatchStream = client.watch(identity)
        self.items: queue.Queue[Item] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.items.put(event)
        except AgentError as exc:
            self.items.put(exc)
            return
        self.items.put(None)

    def next(self, timeout: float = 10) -> Item:
        return self.items.get(timeout=timeout)

    def wait(self, kind: WatchKind, timeout: float = 10) -> WatchEvent:
        """The next event that is not a heartbeat; it must be of ``kind``."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(max(deadline - time.monotonic(), 0.01))
            if isinstance(item, WatchEvent) and item.kind is WatchKind.HEARTBEAT:
                continue
            assert isinstance(item, WatchEvent), item
            assert item.kind is kind, item
            return item

    def heartbeat(self) -> None:
        """The first event: the subscription is in place."""
        assert self.next() == WatchEvent(WatchKind.HEARTBEAT, "watching")

    def ended(self, timeout: float = 10) -> Item:
        """Skip events until the stream ends; None (clean end) or the error it raised."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(max(deadline - time.monotonic(), 0.01))
            if not isinstance(item, WatchEvent):
                return item


@pytest.fixture
def client(broker: Broker, make_node: NodeFactory) -> Iterator[BrokerClient]:
    config = make_node("client-only").config()
    with BrokerClient(config) as c:
        yield c


def ec_key(path: Path) -> Path:
    return write_key(path, ec.generate_private_key(ec.SECP256R1()))


def enrolled(make_node: NodeFactory, name: str, *, distinct: bool = False) -> Node:
    node = make_node(name, distinct=distinct)
    result = node.attest()
    assert result.returncode == 3, result  # enrolled and attested, pending approval
    return node


def test_revocation_arrives_within_5_seconds(
    broker: Broker, make_node: NodeFactory, client: BrokerClient
) -> None:
    node = enrolled(make_node, "worker-1")
    watcher = Watcher(client, node)
    watcher.heartbeat()
    ok(broker.kbs("node", "revoke", node.name))
    revoked_at = time.monotonic()
    event = watcher.wait(WatchKind.REVOKED, timeout=5)
    assert time.monotonic() - revoked_at < 5
    assert "revoked" in event.reason
    watcher.stream.cancel()
    watcher.stream.cancel()  # idempotent
    assert watcher.ended() is None
    assert f"watch node={node.name} started (pending)" in broker.log()


def test_changes_reach_granted_nodes_only(
    broker: Broker, make_node: NodeFactory, client: BrokerClient, tmp_path: Path
) -> None:
    granted = enrolled(make_node, "granted")
    other = enrolled(make_node, "other", distinct=True)
    grant_node(broker, granted, ec_key(tmp_path / "k1.pem"))
    ok(broker.kbs("node", "approve", other.name, "--label", "cluster=dev"))
    ok(broker.kbs("key", "import", "second", "--private-key", str(ec_key(tmp_path / "k2.pem"))))
    watch_granted, watch_other = Watcher(client, granted), Watcher(client, other)
    watch_granted.heartbeat()
    watch_other.heartbeat()

    ok(broker.kbs("grant", "add", "second", "--selector", "cluster=prod"))
    assert "granted" in watch_granted.wait(WatchKind.CHANGED).reason
    ok(broker.kbs("grant", "remove", "second", "--selector", "cluster=prod"))
    assert "removed" in watch_granted.wait(WatchKind.CHANGED).reason
    rotated = ec_key(tmp_path / "k1b.pem")
    ok(broker.kbs("key", "rotate", "prod-key", "--private-key", str(rotated)))
    assert "rotated" in watch_granted.wait(WatchKind.CHANGED).reason
    ok(broker.kbs("key", "retire", "prod-key", "--version", "1"))
    assert "retired" in watch_granted.wait(WatchKind.CHANGED).reason
    ok(broker.kbs("key", "rotate", "second", "--private-key", str(tmp_path / "k1.pem")))
    ok(broker.kbs("key", "retire", "second", "--version", "1"))

    # The other node's first notice is the one about itself: nothing before it was for it.
    ok(broker.kbs("node", "approve", other.name, "--label", "cluster=dev", "--label", "tier=gpu"))
    assert "labels" in watch_other.wait(WatchKind.CHANGED).reason
    # ... and the rotation and retirement of a key granted to nobody reached no one.
    ok(broker.kbs("node", "approve", granted.name, "--label", "cluster=prod"))
    assert "labels" in watch_granted.wait(WatchKind.CHANGED).reason


def test_unknown_and_malformed_names_are_refused(
    make_node: NodeFactory, client: BrokerClient
) -> None:
    """Whatever the name, a stream the caller cannot prove is refused with the same answer: it
    learns nothing about which nodes exist."""
    known = enrolled(make_node, "known")
    for name in ("nobody", known.name, "bad name!", "", "x" * 64, "../etc"):
        guess = NodeIdentity(name, Secret(bytes(32)))
        with pytest.raises(NotAuthenticated, match="node call not authenticated"):
            list(client.watch(guess))


def test_a_revoked_node_hears_it_at_once(
    broker: Broker, make_node: NodeFactory, client: BrokerClient
) -> None:
    node = enrolled(make_node, "gone")
    ok(broker.kbs("node", "revoke", node.name))
    time.sleep(1)  # the change row is old news by the time the node connects
    watcher = Watcher(client, node)
    event = watcher.next(timeout=2)
    assert isinstance(event, WatchEvent)
    assert event.kind is WatchKind.REVOKED


def test_a_newer_stream_displaces_the_oldest_for_the_same_node(
    broker: Broker, make_node: NodeFactory, client: BrokerClient
) -> None:
    node = enrolled(make_node, "busy")
    watchers = []
    for _ in range(MAX_PER_NODE + 1):
        watchers.append(Watcher(client, node))
        watchers[-1].heartbeat()
    assert watchers[0].ended() is None
    ok(broker.kbs("node", "revoke", node.name))
    for watcher in watchers[1:]:
        watcher.wait(WatchKind.REVOKED, timeout=5)


def test_broker_stops_within_its_grace_with_20_open_streams(
    broker: Broker, client: BrokerClient
) -> None:
    names = [f"fleet-{i}" for i in range(20)]
    master = master_keyring(load_config(broker.config))
    identities = []
    with Store.open(broker.directory / "kbs.db") as store:  # node rows as enrollment leaves them
        for i, name in enumerate(names):
            secret = os.urandom(32)
            store.enroll_node(name=name, ek_hash=f"{i:064x}", ek_public=b"ek",
                              ek_certificate=b"cert", ak_public=b"ak", state=NodeState.APPROVED,
                              metadata={}, now=datetime.now(UTC),
                              node_key=seal_new_node_key(master, name, secret))  # fmt: skip
            identities.append(NodeIdentity(name, node_key(secret, name)))
    watchers = [Watcher(client, identity) for identity in identities]
    for watcher in watchers:
        watcher.heartbeat()
    start = time.monotonic()
    broker.stop()  # SIGTERM, then wait
    elapsed = time.monotonic() - start
    assert elapsed < SHUTDOWN_GRACE, f"broker took {elapsed:.1f} s to stop"
    for watcher in watchers:
        assert watcher.ended(timeout=5) is None
    log = broker.log()
    assert log.count("ended (the broker is stopping)") == 20, log


def test_rotation_adds_a_version_file_and_retirement_removes_one(
    broker: Broker, make_node: NodeFactory, tmp_path: Path
) -> None:
    """``key rotate`` installs the new version beside the old one (both released, one file
    each, in every key directory); ``key retire`` removes the old file at the next attestation;
    ``key list`` and ``key show`` say so, naming what the node holds."""
    node = enrolled(make_node, "rotator")
    v1 = write_key(tmp_path / "v1.pem", rsa.generate_private_key(65537, 2048))
    grant_node(broker, node, v1)
    ok(node.attest())
    v2 = write_key(tmp_path / "v2.pem", ec.generate_private_key(ec.SECP384R1()))
    refused = broker.kbs("key", "import", "prod-key", "--private-key", str(v2))
    assert refused.returncode == 2, refused
    assert "key rotate prod-key" in refused.stderr
    ok(broker.kbs("key", "rotate", "prod-key", "--private-key", str(v2)))
    ok(node.attest())
    for key_dir in range(2):
        assert node.key_file("prod-key", key_dir, version=1).read_bytes() == v1.read_bytes()
        assert node.key_file("prod-key", key_dir, version=2).read_bytes() == v2.read_bytes()
        assert sorted(p.name for p in node.key_dirs[key_dir].joinpath("keylease").iterdir()) == [
            "prod-key.v1.pem",
            "prod-key.v2.pem",
        ]
    listing = broker.kbs("key", "list", "--json")
    ok(listing)
    assert [(k["name"], k["version"], k["algorithm"], k["state"])
            for k in json.loads(listing.stdout)] == [
        ("prod-key", 1, "RSA-2048", "active"),
        ("prod-key", 2, "EC-P384", "current"),
    ]  # fmt: skip
    shown = json.loads(broker.kbs("key", "show", "prod-key", "--json").stdout)
    assert [(h["node"], h["versions"]) for h in shown["holders"]] == [("rotator", [1, 2])]

    ok(broker.kbs("key", "retire", "prod-key", "--version", "1"))
    shown = json.loads(broker.kbs("key", "show", "prod-key", "--json").stdout)
    assert [(h["node"], h["versions"]) for h in shown["holders"]] == [("rotator", [1, 2])]
    ok(node.attest())  # what the CHANGED the retirement sent asks the agent to do
    for key_dir in range(2):
        assert not node.key_file("prod-key", key_dir, version=1).exists()
        assert node.key_file("prod-key", key_dir, version=2).read_bytes() == v2.read_bytes()
    shown = json.loads(broker.kbs("key", "show", "prod-key", "--json").stdout)
    assert [v["state"] for v in shown["versions"]] == ["retired", "current"]
    assert [(h["node"], h["versions"]) for h in shown["holders"]] == [("rotator", [2])]
    text = broker.kbs("key", "show", "prod-key").stdout
    assert "rotator" in text
    assert "BEGIN" not in text


def test_a_frozen_broker_ends_the_stream_within_30_seconds(
    broker: Broker, make_node: NodeFactory, client: BrokerClient
) -> None:
    """Keepalive: a broker that stops answering (SIGSTOP: no FIN, no RST) is noticed by the
    client's pings, not after the OS's TCP timeout (regression: gRPC's default ping timeout is a
    minute)."""
    node = enrolled(make_node, "lonely")
    watcher = Watcher(client, node)
    watcher.heartbeat()
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        end = watcher.ended(timeout=40)
        elapsed = time.monotonic() - start
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert isinstance(end, BrokerUnreachable), end
    assert elapsed < 30, f"noticed after {elapsed:.0f} s"


# --- the change feed in-process, on a real database ---------------------------------------------


def test_feed_fans_out_and_folds_a_slow_reader(tmp_path: Path) -> None:
    async def scenario(store: Store, operator: Store) -> None:
        feed = ChangeFeed(store, interval=0.05)
        operator.add_change("old", ChangeKind.REVOKED, "before start", datetime.now(UTC))
        await feed.start()
        slow, other, everyone = feed.subscribe("slow"), feed.subscribe("other"), feed.subscribe("x")
        operator.add_change("other", ChangeKind.CHANGED, "one", datetime.now(UTC))
        assert await other.next(2) == Notice(ChangeKind.CHANGED, "one")
        for i in range(3 * QUEUE_SIZE):  # "slow" never reads while these arrive
            operator.add_change("slow", ChangeKind.CHANGED, f"#{i}", datetime.now(UTC))
        operator.add_change(None, ChangeKind.CHANGED, "all", datetime.now(UTC))
        operator.add_change("other", ChangeKind.CHANGED, "two", datetime.now(UTC))
        assert await other.next(2) == Notice(ChangeKind.CHANGED, "all")
        assert await other.next(2) == Notice(ChangeKind.CHANGED, "two")
        assert await everyone.next(2) == Notice(ChangeKind.CHANGED, "all")
        queued = [await slow.next(0.1) for _ in range(QUEUE_SIZE + 1)]
        assert None in queued  # drained: far fewer than the 3 * QUEUE_SIZE + 1 notices sent
        assert all(n is None or n.kind is ChangeKind.CHANGED for n in queued)
        # A revocation folded into a full queue survives as REVOKED.
        for _ in range(QUEUE_SIZE):
            slow.offer(Notice(ChangeKind.CHANGED, "filler"))
        slow.offer(Notice(ChangeKind.REVOKED, "revoked"))
        slow.offer(Notice(ChangeKind.CHANGED, "after"))
        got = [await slow.next(0.05) for _ in range(3)]
        assert got[0] == Notice(ChangeKind.REVOKED, "revoked")
        assert got[1:] == [Notice(ChangeKind.CHANGED, "after"), None]
        await feed.stop()
        for sub in (slow, other, everyone):
            with pytest.raises(FeedClosed, match="stopping"):
                await sub.next(1)
        with pytest.raises(FeedClosed):
            feed.subscribe("late")
        assert feed.watchers == 0

    with Store.open(tmp_path / "kbs.db") as store, Store.open(tmp_path / "kbs.db") as operator:
        asyncio.run(scenario(store, operator))

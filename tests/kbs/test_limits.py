"""Limits of the node-facing service: message size, per-peer and per-node rate limits with a retry
hint, server-side deadlines, bounded attestation concurrency, slow clients; and their settings.
A call that does not prove its node is refused UNAUTHENTICATED after the per-peer limits: that
answer is how these tests see that the broker served a stranger's request.

Another peer is a real second source address: ``SourceProxy`` reaches the broker from 127.0.0.2."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.broker import BrokerClient
from agent.errors import BrokerBusy
from harness.broker import Broker
from harness.netops import SourceProxy, node_stub, secure_channel
from harness.nodes import Node
from kbs.config import LimitSettings, load_config
from kbs.errors import ConfigError
from kbs.nodeapi.admission import RETRY_AFTER_KEY, LimitInterceptor
from kbs.nodeapi.metrics import BrokerMetrics
from kbs.nodeapi.nodeauth import NodeAuthenticator
from kbs.nodeapi.ratelimit import InflightCounter, TokenBuckets, peer_host
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1 import keylease_pb2_grpc as pb_grpc
from keylease.api.v1.nodeauth import ATTEST, GET_NONCE, auth_metadata
from keylease.secret import Secret

NodeFactory = Callable[..., Node]
NONCE = "/keylease.v1.NodeService/GetNonce"


# --- building blocks -------------------------------------------------------------------------


def test_token_buckets_refill_and_hint() -> None:
    now = [100.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0], max_keys=2)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token comes every 0.5 s
    assert buckets.take("b") == 0.0  # every key has its own bucket
    now[0] += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(0.5)
    buckets.take("c")
    assert len(buckets) == 2  # bounded: the least recently used key is forgotten


def test_inflight_counter_and_peer_host() -> None:
    counter = InflightCounter(2)
    assert counter.acquire("p")
    assert counter.acquire("p")
    assert not counter.acquire("p")
    counter.release("p")
    assert counter.acquire("p")
    counter.release("p")
    counter.release("p")
    assert counter.count("p") == 0
    assert peer_host("ipv4:127.0.0.2:40934") == "127.0.0.2"
    assert peer_host("ipv6:[::1]:8443") == "::1"
    assert peer_host("unix:/run/kbs.sock") == "unix:/run/kbs.sock"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("rate_limit_peer_per_second = -1", "rate_limit_peer_per_second` must be a number"),
        ("rate_limit_node_burst = 0", "rate_limit_node_burst` must be an integer from 1"),
        ("max_inflight_per_peer = 2.5", "max_inflight_per_peer` must be an integer"),
        ("max_concurrent_attestations = true", "max_concurrent_attestations` must be"),
        ('rpc_deadline_seconds = "10"', "rpc_deadline_seconds` must be a number from 0.1"),
        ("rpc_deadline_seconds = nan", "rpc_deadline_seconds` must be a number"),
        ("max_queued_attestations = 1000000", "max_queued_attestations` must be"),
        ('metrics_listen = "localhost"', "metrics_listen` must be HOST:PORT"),
        ("metrics_listen = 9464", "metrics_listen` must be a string"),
        ("rate_limit_per_peer = 3", "unknown key(s) rate_limit_per_peer"),
    ],
)
def test_settings_are_validated(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "kbs.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_settings_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "kbs.toml"
    path.write_text("")
    cfg = load_config(path)
    assert cfg.metrics_listen == ("127.0.0.1", 9464)
    assert cfg.limits == LimitSettings()
    # 10,000 nodes renewing every 60 s behind one NAT address: 2 requests each, ~333/s
    assert cfg.limits.rate_limit_peer_per_second >= 10_000 * 2 / 60 * 1.2
    # one node: enrollment + attestation (4 requests) several times in a row
    assert cfg.limits.rate_limit_node_burst >= 4 * 10
    path.write_text(
        'metrics_listen = ""\nrate_limit_peer_per_second = 0\nrate_limit_node_per_second = 2.5\n'
        "rpc_deadline_seconds = 3\nmax_queued_attestations = 0\n"
    )
    cfg = load_config(path)
    assert cfg.metrics_listen is None
    assert cfg.limits.rate_limit_peer_per_second == 0
    assert cfg.limits.rate_limit_node_per_second == 2.5
    assert cfg.limits.rpc_deadline_seconds == 3
    assert cfg.limits.max_queued_attestations == 0


# --- the real broker -------------------------------------------------------------------------


@pytest.fixture
def channel(broker: Broker) -> Iterator[grpc.Channel]:
    with secure_channel(broker.address, broker.ca) as ch:
        yield ch


def nonce_code(stub: pb_grpc.NodeServiceStub, name: str = "nobody") -> grpc.StatusCode:
    """GetNonce's answer without node credentials; UNAUTHENTICATED means the broker served the
    request (past every per-peer limit)."""
    try:
        stub.GetNonce(pb.GetNonceRequest(node_name=name), timeout=10)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def test_oversized_message_is_refused_and_the_broker_keeps_serving(
    broker: Broker, channel: grpc.Channel
) -> None:
    stub = node_stub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Attest(pb.AttestRequest(node_name="big", event_log=b"\0" * (3 << 20)), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in str(info.value.details())
    assert nonce_code(stub) == grpc.StatusCode.UNAUTHENTICATED
    with secure_channel(broker.address, broker.ca) as other:
        assert nonce_code(node_stub(other)) == grpc.StatusCode.UNAUTHENTICATED


def test_flood_from_one_peer_is_refused_with_a_hint_while_another_peer_is_served(
    broker: Broker, make_node: NodeFactory
) -> None:
    broker.restart(rate_limit_peer_per_second=2, rate_limit_peer_burst=5)
    node = make_node("worker-far")
    flooding = threading.Event()
    refused: list[grpc.RpcError] = []

    def flood() -> None:
        with secure_channel(broker.address, broker.ca) as ch:
            stub = node_stub(ch)
            while flooding.is_set():
                try:
                    stub.GetNonce(pb.GetNonceRequest(node_name="nobody"), timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refused.append(exc)

    flooding.set()
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    proxy = SourceProxy(broker.address, "127.0.0.2")
    address, broker.address = broker.address, proxy.address
    try:
        time.sleep(0.5)
        result = node.attest()  # enrollment + attestation, 4 requests, from 127.0.0.2
        assert result.returncode == 3, result  # served: enrolled, pending approval
        identity = node.identity()
        broker.address = address
        # from 127.0.0.1, inside the flood
        with BrokerClient(node.config()) as client, pytest.raises(BrokerBusy) as busy:
            client.get_nonce(identity)
    finally:
        flooding.clear()
        flooder.join(10)
        broker.address = address
        proxy.close()
    assert busy.value.retry_after_seconds is not None
    assert 0 < busy.value.retry_after_seconds <= 0.5
    assert "busy, retry later" in str(busy.value)
    assert len(refused) > 20
    first = refused[0]
    trailing = {m.key: str(m.value) for m in first.trailing_metadata() or ()}
    assert int(trailing[RETRY_AFTER_KEY]) > 0
    details = str(first.details())
    assert "too many requests from 127.0.0.1 (2/s)" in details
    assert f"retry in {trailing[RETRY_AFTER_KEY]} ms" in details
    assert "127.0.0.2" not in broker.log()  # the other peer was never refused


def test_per_node_rate_limit(broker: Broker, make_node: NodeFactory) -> None:
    """The node's own calls spend its budget (strangers' cannot: test_attacks)."""
    a, b = make_node("worker-a"), make_node("worker-b", distinct=True)
    assert a.attest().returncode == b.attest().returncode == 3  # enrolled, pending
    broker.restart(rate_limit_node_per_second=1, rate_limit_node_burst=3)

    def codes(node: Node, n: int) -> list[grpc.StatusCode]:
        found = []
        with BrokerClient(node.config()) as client:
            identity = node.identity()
            for _ in range(n):
                try:
                    client.get_nonce(identity)
                    found.append(grpc.StatusCode.OK)
                except BrokerBusy:
                    found.append(grpc.StatusCode.RESOURCE_EXHAUSTED)
        return found

    assert codes(a, 6) == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert codes(b, 1) == [grpc.StatusCode.OK]  # its own budget
    assert "too many requests for node 'worker-a' (1/s)" in broker.log()


def test_slow_clients_do_not_block_others(broker: Broker) -> None:
    broker.restart(rpc_deadline_seconds=1, max_inflight_per_peer=8)
    host, _, port = broker.address.rpartition(":")
    # Connections that never say anything (not even a TLS hello) ...
    idle = [socket.create_connection((host, int(port))) for _ in range(50)]
    # ... and calls whose request never arrives.
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(30)
        yield b""

    stalled_channel = secure_channel(broker.address, broker.ca)
    stalled_call = stalled_channel.stream_unary(
        NONCE, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    stalled = [stalled_call.future(never()) for _ in range(64)]
    proxy = SourceProxy(broker.address, "127.0.0.2")
    try:
        time.sleep(0.3)
        with secure_channel(proxy.address, broker.ca) as other:
            start = time.monotonic()
            for _ in range(5):
                assert nonce_code(node_stub(other)) == grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() - start < 2
        codes = [f.exception().code() for f in stalled]  # type: ignore[union-attr]
        assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 8  # the per-peer in-flight cap
        # once cut off, the slow peer itself is served again
        with secure_channel(broker.address, broker.ca) as again:
            assert nonce_code(node_stub(again)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        release.set()
        proxy.close()
        stalled_channel.close()
        for s in idle:
            s.close()
    assert "not done within 1 s" in broker.log()


# --- deadlines and attestation concurrency (in-process server, a slow handler) ---------------


class SlowService(pb_grpc.NodeServiceServicer):
    """Attest takes as many seconds as its ``nonce`` says; GetNonce answers at once."""

    async def GetNonce(self, request: pb.GetNonceRequest, context: Any) -> pb.GetNonceResponse:
        return pb.GetNonceResponse(nonce=b"n" * 32)

    async def Attest(self, request: pb.AttestRequest, context: Any) -> pb.AttestResponse:
        await asyncio.sleep(float(request.nonce.decode() or 0))
        return pb.AttestResponse(outcome=pb.ATTEST_OUTCOME_PENDING_APPROVAL)


NODE, KEY = "n", Secret(b"k" * 32)


class SignedStub:
    """Attest and GetNonce as node NODE calls them: signed with its key KEY."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def _call(self, method: str, request: Any, response: Any) -> Any:
        request.node_name = request.node_name or NODE
        raw = request.SerializeToString()
        call = self._channel.unary_unary(
            method, request_serializer=None, response_deserializer=response.FromString
        )
        return call(raw, metadata=auth_metadata(KEY, method, request.node_name, raw))

    def Attest(self, request: pb.AttestRequest) -> Any:
        return self._call(ATTEST, request, pb.AttestResponse)

    def GetNonce(self, request: pb.GetNonceRequest) -> Any:
        return self._call(GET_NONCE, request, pb.GetNonceResponse)


async def _with_server(settings: LimitSettings, body: Callable[[SignedStub], Any]) -> BrokerMetrics:
    metrics = BrokerMetrics()
    auth = NodeAuthenticator(lambda name: KEY if name == NODE else None, inline=True)
    server = grpc.aio.server(interceptors=[LimitInterceptor(settings, metrics, auth)])
    pb_grpc.add_NodeServiceServicer_to_server(SlowService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(SignedStub(channel))
    finally:
        await server.stop(0)
    return metrics


async def _code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def test_server_side_deadline_cancels_a_slow_rpc() -> None:
    async def body(stub: SignedStub) -> None:
        start = time.monotonic()
        slow = asyncio.ensure_future(_code_of(stub.Attest(pb.AttestRequest(nonce=b"30"))))
        assert await _code_of(stub.GetNonce(pb.GetNonceRequest())) == grpc.StatusCode.OK
        assert await slow == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 3

    metrics = asyncio.run(_with_server(LimitSettings(rpc_deadline_seconds=0.5), body))
    assert (
        metrics.registry.get_sample_value("keylease_requests_limited_total", {"limit": "deadline"})
        == 1
    )


def test_attestation_flood_queues_then_is_refused() -> None:
    async def body(stub: SignedStub) -> None:
        calls = [stub.Attest(pb.AttestRequest(nonce=b"0.5")) for _ in range(4)]
        results = asyncio.gather(*(_code_of(c) for c in calls))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        assert await _code_of(stub.GetNonce(pb.GetNonceRequest())) == grpc.StatusCode.OK
        assert time.monotonic() - start < 0.3  # not stuck behind the attestations
        codes = await results
        assert codes.count(grpc.StatusCode.OK) == 2  # one running, one queued
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2
        refused = stub.Attest(pb.AttestRequest(nonce=b"0"))
        assert await _code_of(refused) == grpc.StatusCode.OK  # free again

    settings = LimitSettings(max_concurrent_attestations=1, max_queued_attestations=1)
    metrics = asyncio.run(_with_server(settings, body))
    assert (
        metrics.registry.get_sample_value("keylease_requests_limited_total", {"limit": "busy"}) == 2
    )

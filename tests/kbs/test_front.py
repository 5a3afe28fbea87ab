"""The connection front (kbs.nodeapi.front) and the stream caps of admission control, on a real
gRPC server in this process over real sockets: connection caps per address and in total, the
first-byte deadline, the client's real address reaching the per-peer limits, streams counted for
their whole life, and grpc.health.v1 inside admission control."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from harness.netops import SourceProxy
from kbs.config import LimitSettings, load_config
from kbs.errors import ConfigError
from kbs.nodeapi.admission import LimitInterceptor
from kbs.nodeapi.front import FDS_PER_CONNECTION, RESERVED_FDS, ConnectionFront, FrontLimits
from kbs.nodeapi.metrics import BrokerMetrics
from kbs.nodeapi.nodeauth import NodeAuthenticator
from kbs.nodeapi.ratelimit import PeerMap
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1 import keylease_pb2_grpc as pb_grpc
from keylease.api.v1.nodeauth import GET_NONCE, WATCH, auth_metadata
from keylease.secret import Secret


class Service(pb_grpc.NodeServiceServicer):
    async def GetNonce(self, request: pb.GetNonceRequest, context: Any) -> pb.GetNonceResponse:
        return pb.GetNonceResponse(nonce=b"n" * 32)

    async def Watch(self, request: pb.WatchRequest, context: Any) -> AsyncIterator[pb.WatchEvent]:
        while True:
            yield pb.WatchEvent(kind=pb.WATCH_KIND_HEARTBEAT)
            await asyncio.sleep(3600)


class Served:
    """A gRPC server with the admission interceptor behind a connection front."""

    def __init__(self, front: ConnectionFront, metrics: BrokerMetrics, port: int) -> None:
        self.front = front
        self.metrics = metrics
        self.port = port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


async def serve(
    limits: FrontLimits,
    settings: LimitSettings,
    body: Callable[[Served], Awaitable[None]],
    host: str = "127.0.0.1",
) -> None:
    metrics, peers = BrokerMetrics(), PeerMap()
    server = grpc.aio.server(interceptors=[LimitInterceptor(settings, metrics, node_keys(), peers)])
    pb_grpc.add_NodeServiceServicer_to_server(Service(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    backend = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    front = ConnectionFront(limits, backend, metrics, peers)
    port = await front.start(host, 0)
    try:
        await body(Served(front, metrics, port))
    finally:
        await front.close()
        await server.stop(0)


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=5)


def is_closed(s: socket.socket) -> bool:
    s.settimeout(2)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def settle() -> None:
    await asyncio.sleep(0.2)


KEY = Secret(b"k" * 32)  # every test node's key: the calls below prove their node, as agents do


def node_keys() -> NodeAuthenticator:
    return NodeAuthenticator(lambda name: KEY, inline=True)


def signed(method: str, request: Any) -> tuple[tuple[str, str]]:
    return auth_metadata(KEY, method, request.node_name, request.SerializeToString())


def get_nonce(stub: pb_grpc.NodeServiceStub) -> Any:
    request = pb.GetNonceRequest(node_name="n0")
    return stub.GetNonce(request, metadata=signed(GET_NONCE, request))


def watch(stub: pb_grpc.NodeServiceStub, name: str) -> Any:
    request = pb.WatchRequest(node_name=name)
    return stub.Watch(request, metadata=signed(WATCH, request))


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def test_front_limits_are_sized_from_the_descriptor_limit() -> None:
    default = LimitSettings()
    assert FrontLimits.sized(default, 1024) == FrontLimits(256, 128, 10.0)
    assert FrontLimits.sized(default, 65536) == FrontLimits(21760, 1024, 10.0)
    explicit = LimitSettings(max_connections=100, max_connections_per_address=80)
    assert FrontLimits.sized(explicit, 65536) == FrontLimits(100, 50, 10.0)  # half at most


def test_connections_beyond_the_per_address_cap_are_reset_at_once() -> None:
    async def body(served: Served) -> None:
        held = [connect(served.port) for _ in range(3)]
        await settle()
        extra = [connect(served.port) for _ in range(2)]
        await settle()
        assert [await asyncio.to_thread(is_closed, s) for s in extra] == [True, True]
        assert served.front.connections == 3
        other = connect(served.port, "127.0.0.2")  # another address has its own cap
        await settle()
        assert served.front.connections == 4
        assert served.sample("keylease_connections_refused_total", reason="address_limit") == 2
        held[0].close()  # a slot comes back when a connection goes
        await settle()
        again = connect(served.port)
        await settle()
        assert served.front.connections == 4
        for s in [*held, *extra, other, again]:
            s.close()

    asyncio.run(serve(FrontLimits(10, 3, 30), LimitSettings(), body))


def test_connections_beyond_the_total_are_reset() -> None:
    async def body(served: Served) -> None:
        held = [connect(served.port, f"127.0.0.{i}") for i in range(1, 5)]
        await settle()
        extra = connect(served.port, "127.0.0.9")
        await settle()
        assert await asyncio.to_thread(is_closed, extra)
        assert served.sample("keylease_connections_refused_total", reason="total_limit") == 1
        for s in [*held, extra]:
            s.close()

    asyncio.run(serve(FrontLimits(4, 2, 30), LimitSettings(), body))


def test_a_connection_that_says_nothing_is_closed_after_the_handshake_timeout() -> None:
    async def body(served: Served) -> None:
        silent = connect(served.port)
        start = time.monotonic()
        assert await asyncio.to_thread(is_closed, silent)
        assert 0.4 <= time.monotonic() - start < 1.5
        assert served.sample("keylease_connections_refused_total", reason="no_tls") == 1
        assert served.front.connections == 0
        silent.close()

    asyncio.run(serve(FrontLimits(10, 5, 0.5), LimitSettings(), body))


ONE_REQUEST_PER_PEER = LimitSettings(rate_limit_peer_per_second=0.01, rate_limit_peer_burst=1)


async def refused_as(address: str) -> str:
    """The address a peer's second request is refused as (one request per peer is allowed)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        assert await code_of(get_nonce(stub)) == grpc.StatusCode.OK
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get_nonce(stub)
    found = re.search(r"too many requests from (\S+) ", str(info.value.details()))
    assert found, info.value.details()
    return found.group(1)


def test_per_peer_limits_see_the_real_client_address_through_the_front() -> None:
    async def body(served: Served) -> None:
        proxy = SourceProxy(served.address, "127.0.0.2")
        try:
            assert await refused_as(proxy.address) == "127.0.0.2"
            assert await refused_as(served.address) == "127.0.0.1"  # its own budget
        finally:
            proxy.close()

    asyncio.run(serve(FrontLimits(10, 5, 30), ONE_REQUEST_PER_PEER, body))


def test_an_ipv4_client_of_a_dual_stack_listener_is_named_by_its_ipv4_address() -> None:
    async def body(served: Served) -> None:
        assert await refused_as(served.address) == "127.0.0.1"

    asyncio.run(serve(FrontLimits(10, 5, 30), ONE_REQUEST_PER_PEER, body, host="::"))


def test_watch_streams_hold_their_slot_for_their_whole_life() -> None:
    async def body(served: Served) -> None:
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = pb_grpc.NodeServiceStub(channel)
            open_ = [watch(stub, f"n{i}") for i in range(2)]
            for call in open_:
                await call.read()  # admitted, and still open
            third = watch(stub, "n3")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await third.read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 Watch streams from 127.0.0.1 are already open" in str(info.value.details())
            # unary calls are not held up by the streams
            assert await code_of(get_nonce(stub)) == grpc.StatusCode.OK
            open_[0].cancel()
            await asyncio.sleep(0.2)
            again = watch(stub, "n4")
            await again.read()
            assert served.sample("keylease_watch_streams") == 2
            again.cancel()
            open_[1].cancel()

    settings = LimitSettings(max_watch_streams_per_peer=2)
    asyncio.run(serve(FrontLimits(10, 5, 30), settings, body))


def test_health_service_is_inside_admission_control() -> None:
    async def body(served: Served) -> None:
        async with grpc.aio.insecure_channel(served.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
            for call in watches:
                assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Watch(health_pb2.HealthCheckRequest()).read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert served.sample("keylease_health_watch_streams") == 2
            # Check is a unary call: the per-peer rate applies (burst 5: 2 watches + 3 spent)
            codes = [await code_of(health.Check(health_pb2.HealthCheckRequest())) for _ in range(3)]
            assert codes == [
                grpc.StatusCode.OK,
                grpc.StatusCode.OK,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ]
            assert served.sample("keylease_rpcs_total", method="Health.Check", code="OK") == 2
            for call in watches:
                call.cancel()

    settings = LimitSettings(
        max_health_watches_per_peer=2, rate_limit_peer_per_second=0.01, rate_limit_peer_burst=5
    )
    asyncio.run(serve(FrontLimits(10, 5, 30), settings, body))


def test_the_units_descriptor_limit_carries_a_large_fleet() -> None:
    """systemd/keylease-kbs.service's LimitNOFILE, as the broker sizes its connections from it:
    one connection per agent (its watch stream), three descriptors each."""
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "keylease-kbs.service").read_text()
    nofile = int(re.search(r"^LimitNOFILE=(\d+)$", unit, re.M).group(1))  # type: ignore[union-attr]
    limits = FrontLimits.sized(LimitSettings(), nofile)
    assert limits.max_connections >= 20_000
    assert limits.per_address == LimitSettings().max_connections_per_address
    assert nofile >= FDS_PER_CONNECTION * limits.max_connections + RESERVED_FDS


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_connections_per_address = -1", "max_connections_per_address` must be an integer"),
        ("handshake_timeout_seconds = 0", "handshake_timeout_seconds` must be a number from 0.1"),
        ("idle_timeout_seconds = 0.5", "idle_timeout_seconds` must be a number from 1"),
        ("max_health_watches_per_peer = 5000", "max_health_watches_per_peer` must be"),
        ("max_watch_streams_per_peer = 0", "max_watch_streams_per_peer` must be an integer from 1"),
    ],
)
def test_connection_settings_are_validated(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "kbs.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)

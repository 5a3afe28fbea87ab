"""The connection front of the node listener: connection caps before gRPC sees a connection.

gRPC's Python server accepts every TCP connection and has no per-address limit (only a
server-wide one); idle connections that never start TLS each hold a file descriptor until the
handshake times out, and 1,300 of them exhausted a broker with 1,024. So the broker's ``listen``
address is served here, by asyncio, and gRPC listens on a loopback port behind it:

1. a connection beyond ``max_connections`` in all, or beyond the per-address cap from its client
   address (``max_connections_per_address``, never more than half of ``max_connections``), is
   reset at once;
2. it must send its first byte (the TLS ClientHello) within ``handshake_timeout_seconds``, or it
   is closed; until then it holds only its own socket;
3. then it is relayed byte for byte to gRPC on ``127.0.0.1`` (TLS stays end to end between the
   agent and gRPC: the front never sees plaintext), and the relay's local port is recorded in a
   ``PeerMap``, so that the admission limits (``kbs.nodeapi.admission``) see the client's real
   address. When either side closes, the front closes the other.

gRPC ends TLS handshakes slower than ``handshake_timeout_seconds`` and closes connections that
carry no RPC for ``idle_timeout_seconds`` (``kbs.server``).

File descriptors: a relayed connection holds three (the client's socket, the relay's socket to
gRPC, gRPC's end of it). ``max_connections = 0`` sizes the total from the process's limit
(``RLIMIT_NOFILE``): ``(limit - RESERVED_FDS) // 3``; with systemd's ``LimitNOFILE=65536`` that
is 21,760 connections, one per agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import resource
import socket
import struct
from dataclasses import dataclass

from kbs.config import LimitSettings
from kbs.errors import ConfigError
from kbs.nodeapi.metrics import BrokerMetrics
from kbs.nodeapi.ratelimit import PeerMap
from kbs.nodeapi.refusals import ThrottledLog

__all__ = ["FDS_PER_CONNECTION", "RESERVED_FDS", "ConnectionFront", "FrontLimits", "fd_limit"]

log = logging.getLogger(__name__)

FDS_PER_CONNECTION = 3
RESERVED_FDS = 256  # database, TLS and key files, the metrics and admin listeners, the loop
MIN_CONNECTIONS = 16
BACKEND_HOST = "127.0.0.1"
BACKLOG = 4096  # the kernel's queue of connections not accepted yet
ACCEPT_BATCH = 64  # connections accepted per wake-up (each refused one is closed at once)
ACCEPT_PAUSE = 0.1  # seconds without accepting after the process ran out of descriptors
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and frees the socket


def fd_limit() -> int:
    """This process's soft limit on open file descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


@dataclass(frozen=True)
class FrontLimits:
    max_connections: int
    per_address: int
    handshake_timeout: float

    @classmethod
    def sized(cls, settings: LimitSettings, nofile: int) -> FrontLimits:
        """The limits ``settings`` ask for, with ``max_connections = 0`` sized from ``nofile``."""
        total = settings.max_connections or max(
            MIN_CONNECTIONS, (nofile - RESERVED_FDS) // FDS_PER_CONNECTION
        )
        per_address = min(settings.max_connections_per_address, max(1, total // 2))
        return cls(total, per_address, settings.handshake_timeout_seconds)


class ConnectionFront:
    """Accepts on the public address and relays to gRPC's loopback port; ``start``, ``close``."""

    def __init__(
        self,
        limits: FrontLimits,
        backend_port: int,
        metrics: BrokerMetrics,
        peers: PeerMap,
    ) -> None:
        self.limits = limits
        self.peers = peers
        self._backend_port = backend_port
        self._metrics = metrics
        self._per_address: dict[str, int] = {}
        self._open: set[_Client] = set()
        self._listeners: list[socket.socket] = []
        self._throttled = ThrottledLog(log)

    @property
    def connections(self) -> int:
        return len(self._open)

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0 picks one); returns the port. ConfigError if taken."""
        loop = asyncio.get_running_loop()
        try:
            for sock in _listen(host, port):
                self._listeners.append(sock)
                port = sock.getsockname()[1]  # every address of a host name on the same port
                loop.add_reader(sock, self._accept, sock)
        except OSError as exc:
            self.stop_accepting()
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"cannot listen on {where}: {reason}; is another broker running?"
            ) from None
        return port

    def stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._listeners:
            loop.remove_reader(sock)
            sock.close()
        self._listeners.clear()

    async def close(self) -> None:
        """Stop accepting and close every connection still open."""
        self.stop_accepting()
        for client in list(self._open):
            client.abort()

    def _accept(self, listener: socket.socket) -> None:
        """Accept what is waiting, a batch at a time: a refused connection is reset before the
        next one is accepted, so a flood never holds more descriptors than the caps allow."""
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peername = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                self._throttled.log(
                    logging.ERROR,
                    "emfile",
                    "cannot accept connections: %s; raise LimitNOFILE or lower max_connections",
                    exc.strerror,
                )
                loop.remove_reader(listener)
                loop.call_later(ACCEPT_PAUSE, self._resume, listener)
                return
            client = _Client(self, _client_host(peername))
            if not self.admit(client):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                sock.close()
                continue
            sock.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(client.protocol, sock))
            task.add_done_callback(client.started)

    def _resume(self, listener: socket.socket) -> None:
        if listener in self._listeners:
            asyncio.get_running_loop().add_reader(listener, self._accept, listener)

    # --- called by the connections -----------------------------------------------------------

    def admit(self, client: _Client) -> bool:
        host = client.host
        if len(self._open) >= self.limits.max_connections:
            self.refused(
                "total_limit",
                f"{self.limits.max_connections} connections are open, "
                "the broker's limit (max_connections)",
                host,
            )
            return False
        count = self._per_address.get(host, 0)
        if count >= self.limits.per_address:
            self.refused(
                "address_limit",
                f"{count} connections from {host} are open, its "
                "limit (max_connections_per_address)",
                host,
            )
            return False
        self._per_address[host] = count + 1
        self._open.add(client)
        self._metrics.connections.set(len(self._open))
        return True

    def release(self, client: _Client) -> None:
        self._open.discard(client)
        count = self._per_address.get(client.host, 0) - 1
        if count > 0:
            self._per_address[client.host] = count
        else:
            self._per_address.pop(client.host, None)
        self._metrics.connections.set(len(self._open))

    def refused(self, reason: str, why: str, host: str) -> None:
        self._metrics.connections_refused.labels(reason).inc()
        self._throttled.log(logging.WARNING, reason, "connection from %s closed: %s", host, why)

    async def connect_backend(self, client: _Client) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(
            lambda: _Backend(client), BACKEND_HOST, self._backend_port
        )
        return transport


def _client_host(peername: object) -> str:
    """The client's IP address as gRPC would name it (an IPv4-mapped IPv6 address as IPv4)."""
    if not isinstance(peername, tuple) or not peername:
        return "?"
    host = str(peername[0])
    with contextlib.suppress(ValueError):
        mapped = ipaddress.ip_address(host)
        if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
            return str(mapped.ipv4_mapped)
    return host


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host:port``: one dual-stack socket for "::" (as gRPC binds
    "[::]"), else one per address ``host`` resolves to, all on one port."""
    if host == "::":
        sock = socket.create_server(
            ("::", port), family=socket.AF_INET6, backlog=BACKLOG, dualstack_ipv6=True
        )
        sock.setblocking(False)
        return [sock]
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, *_, address in dict.fromkeys((f, a) for f, *_, a in found):
            sock = socket.create_server(
                (address[0], port), family=family, backlog=BACKLOG, reuse_port=False
            )
            sockets.append(sock)
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Client(asyncio.Protocol):
    """The client's side of one relayed connection."""

    def __init__(self, front: ConnectionFront, host: str) -> None:
        self.front = front
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.backend: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._admitted = False
        self._closed = False
        self._connecting: asyncio.Task[None] | None = None

    def protocol(self) -> _Client:
        return self

    def started(self, task: asyncio.Task[tuple[asyncio.Transport, asyncio.Protocol]]) -> None:
        """The transport could not be set up (the socket failed at once): give the slot back."""
        if task.cancelled() or task.exception() is not None:
            self.front.release(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._admitted = True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.front.limits.handshake_timeout, self._silent)

    def _silent(self) -> None:
        self._timer = None
        if self.transport is not None and self.backend is None and not self._pending:
            timeout = self.front.limits.handshake_timeout
            self.front.refused("no_tls", f"nothing sent within {timeout:g} s", self.host)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.backend is not None:
            self.backend.write(data)
            return
        self._pending.append(data)
        if self._connecting is None:  # the first bytes: open the relay to gRPC
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            assert self.transport is not None
            self.transport.pause_reading()
            self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        try:
            backend = await self.front.connect_backend(self)
        except OSError as exc:
            self.front.refused("backend", f"the gRPC listener is unreachable ({exc})", self.host)
            self.transport.abort()
            return
        if self._closed:
            backend.abort()
            return
        self.backend = backend
        backend.write(b"".join(self._pending))
        self._pending.clear()
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._admitted:
            self._admitted = False
            self.front.release(self)
        if self.backend is not None:
            self.backend.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # flow control: while the client cannot take more, stop reading from gRPC
    def pause_writing(self) -> None:
        if self.backend is not None:
            self.backend.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.resume_reading()


class _Backend(asyncio.Protocol):
    """The relay's connection to gRPC for one client."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.port = transport.get_extra_info("sockname")[1]
        self.client.front.peers.add(self.port, self.client.host, self)

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.front.peers.remove(self.port, self)
        if self.client.transport is not None:
            self.client.transport.close()

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None and self.client.backend is not None:
            self.client.transport.resume_reading()

"""Network helpers for the operations tests: a TCP forwarder that reaches the broker from another
loopback source address (127.0.0.2), a raw TLS channel to a test broker, raw node calls (signed
with a node's key or not), and a /metrics scraper."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import urllib.request
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from prometheus_client.parser import text_string_to_metric_families

from agent.blobs import NodeIdentity
from harness.broker import Broker
from keylease.api.v1 import keylease_pb2_grpc as pb_grpc
from keylease.api.v1.nodeauth import auth_metadata

__all__ = ["SourceProxy", "metrics_port", "node_call", "node_stub", "scrape", "secure_channel"]

M = TypeVar("M", bound=Message)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class SourceProxy:
    """Accepts on 127.0.0.1:``port`` and forwards each connection to ``target`` from ``source``
    (another loopback address), so the broker sees a different peer address."""

    def __init__(self, target: str, source: str = "127.0.0.2") -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._source = source
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target, source_address=(self._source, 0))
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def secure_channel(address: str, ca: Path, max_send: int = 4 << 20) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.secure_channel(
        address,
        creds,
        options=[("grpc.max_send_message_length", max_send), ("grpc.enable_retries", 0)],
    )


def node_stub(channel: grpc.Channel) -> pb_grpc.NodeServiceStub:
    return pb_grpc.NodeServiceStub(channel)


def node_call(
    channel: grpc.Channel,
    method: str,
    request: Message,
    response: type[M],
    identity: NodeIdentity | None = None,
    timeout: float = 10,
) -> M:
    """One unary node call of ``method`` (the full path), its request sent exactly as serialized
    here; ``identity``: signed with that node's key, as its agent would (else unsigned)."""
    raw = request.SerializeToString()
    metadata = None
    if identity is not None:
        metadata = auth_metadata(identity.key, method, identity.node_name, raw)
    call = channel.unary_unary(
        method, request_serializer=None, response_deserializer=response.FromString
    )
    reply: M = call(raw, metadata=metadata, timeout=timeout)
    return reply


def metrics_port(broker: Broker) -> int:
    """The metrics port of the broker's latest start (from its log)."""
    found = re.findall(r"metrics on http://[^ ]+:(\d+)/metrics", broker.log())
    assert found, broker.log()
    return int(found[-1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples

"""Floods against a broker's node listener, for the abuse tests (tests/kbs/test_floods.py) and
the soak (scripts/soak.py): each runs in a thread of its own until ``stop``.

- ``HealthWatchFlood``: one client opens thousands of grpc.health.v1 Health/Watch streams (issue
  10, attack 3) and holds whatever the broker lets it keep open.
- ``IdleConnectionFlood``: one client address keeps N TCP connections open that never start TLS
  (attack 4), opening a new one whenever the broker closes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import resource
import select
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["HealthWatchFlood", "IdleConnectionFlood", "raise_fd_limit"]


def raise_fd_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to at least ``needed`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


class HealthWatchFlood:
    """``streams`` Health/Watch calls over ``channels`` connections from this process, opened
    ``batch`` at a time (a burst of thousands at once is partly cancelled by gRPC's own
    pending-call limit: opening them batch by batch is how a client holds them all); ``ready`` is
    set once every call is either open (it received its first status) or ended."""

    def __init__(
        self, address: str, ca: Path, streams: int, channels: int = 4, batch: int = 500
    ) -> None:
        self.address = address
        self.ca = ca.read_bytes()
        self.streams = streams
        self.channels = channels
        self.batch = batch
        self.outcomes: Counter[str] = Counter()  # "open" or the status code name that ended it
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="health-flood")

    def start(self, timeout: float = 120) -> HealthWatchFlood:
        self._thread.start()
        if not self.ready.wait(timeout):
            raise TimeoutError(f"the flood did not settle in {timeout} s: {dict(self.outcomes)}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca)
        channels = [
            grpc.aio.secure_channel(
                self.address, creds, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(self.channels)
        ]

        async def one(i: int, settled: asyncio.Event) -> None:
            stub = health_pb2_grpc.HealthStub(channels[i % len(channels)])
            call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            try:
                await call.read()
                self.outcomes["open"] += 1
                settled.set()
                await call.read()  # held until the flood stops (or the broker ends it)
            except grpc.aio.AioRpcError as exc:
                self.outcomes[exc.code().name] += 1
            except asyncio.CancelledError:
                call.cancel()
                raise
            finally:
                settled.set()

        tasks: list[asyncio.Task[None]] = []
        for first in range(0, self.streams, self.batch):
            events = [asyncio.Event() for _ in range(min(self.batch, self.streams - first))]
            tasks += [asyncio.create_task(one(first + i, e)) for i, e in enumerate(events)]
            for event in events:
                await event.wait()
        self.ready.set()
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close(None)


class IdleConnectionFlood:
    """Keeps ``count`` TCP connections from ``source`` to ``target`` open without sending a byte;
    a connection the broker closes is replaced within ``period`` seconds."""

    def __init__(
        self, target: str, count: int, source: str = "127.0.0.1", period: float = 0.1
    ) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.count = count
        self.source = source
        self.period = period
        self.opened = 0
        self.closed_by_peer = 0
        self.connect_errors = 0
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="idle-flood")
        raise_fd_limit(count + 256)

    def start(self) -> IdleConnectionFlood:
        self._fill()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(30)
        for s in self._sockets:
            s.close()
        self._sockets.clear()

    @property
    def open_now(self) -> int:
        return len(self._sockets)

    def _fill(self) -> None:
        while len(self._sockets) < self.count and not self._stopping.is_set():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((self.source, 0))
                s.settimeout(2)
                s.connect(self.target)
            except OSError as exc:
                s.close()
                self.connect_errors += 1
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    return
                continue
            s.setblocking(False)
            self._sockets.append(s)
            self.opened += 1

    def _run(self) -> None:
        while not self._stopping.is_set():
            start = time.monotonic()
            readable: list[socket.socket] = []
            for i in range(0, len(self._sockets), 512):  # select() takes fds < 1024 only: poll
                poller = select.poll()
                chunk = self._sockets[i : i + 512]
                by_fd = {s.fileno(): s for s in chunk}
                for fd in by_fd:
                    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
                readable += [by_fd[fd] for fd, _ in poller.poll(0)]
            for s in readable:  # nothing is ever sent to us: readable means closed
                with contextlib.suppress(OSError):
                    s.recv(1)
                s.close()
                self._sockets.remove(s)
                self.closed_by_peer += 1
            self._fill()
            self._stopping.wait(max(0.0, self.period - (time.monotonic() - start)))

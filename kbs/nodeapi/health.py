"""gRPC health checking (grpc.health.v1) on the node listener, driven by a database probe.

``HealthMonitor`` reports SERVING / NOT_SERVING for ``""`` (the whole broker) and
``keylease.v1.NodeService``. Every ``interval`` seconds it runs one cheap query
(``Store.ping``, ``SELECT 1``) off the event loop; a failure or a probe slower than ``timeout``
turns both to NOT_SERVING, the next success turns them back to SERVING, with one log line per
transition. Nothing else changes while the database is down: RPCs answer UNAVAILABLE on their
own (``DatabaseUnavailable``) and the pool reconnects when the database is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from kbs.errors import KbsError

__all__ = ["NODE_SERVICE", "PROBE_INTERVAL", "PROBE_TIMEOUT", "HealthMonitor", "Pingable"]

log = logging.getLogger(__name__)

NODE_SERVICE = "keylease.v1.NodeService"
SERVICES = ("", NODE_SERVICE)
PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 5.0
SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING


class Pingable(Protocol):
    def ping(self) -> None: ...


class HealthMonitor:
    """The health servicer plus the probe loop; ``add_to_server``, then ``start``/``stop``."""

    def __init__(
        self, store: Pingable, interval: float = PROBE_INTERVAL, timeout: float = PROBE_TIMEOUT
    ) -> None:
        self._store = store
        self._interval = interval
        self._timeout = timeout
        self.servicer = health_aio.HealthServicer()
        self._healthy: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def healthy(self) -> bool:
        return bool(self._healthy)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Probe once (so the first answer is true), then every ``interval`` seconds."""
        await self.probe()
        self._task = asyncio.create_task(self._run(), name="keylease-health-probe")

    async def stop(self) -> None:
        """Stop probing and answer NOT_SERVING from now on (graceful shutdown)."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()

    async def probe(self) -> bool:
        """One probe; updates the reported status and returns whether the database answered."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self._store.ping), self._timeout)
        except KbsError as exc:
            await self._report(False, str(exc))
        except TimeoutError:
            await self._report(False, f"the database did not answer within {self._timeout:.0f} s")
        else:
            await self._report(True, "")
        return self.healthy

    async def _report(self, healthy: bool, why: str) -> None:
        if healthy == self._healthy:
            return
        if healthy:
            log.info("database reachable: health SERVING")
        elif self._healthy is None:
            log.warning("database unreachable at start: health NOT_SERVING (%s)", why)
        else:
            log.warning("database unreachable: health NOT_SERVING until it answers (%s)", why)
        self._healthy = healthy
        for service in SERVICES:
            await self.servicer.set(service, SERVING if healthy else NOT_SERVING)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            if not self._stopping.is_set():
                await self.probe()

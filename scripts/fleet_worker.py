"""One load-generating process of the fleet benchmark (``scripts.bench_fleet``).

A worker owns one swtpm carrying many node identities (``scripts.fleet_tpm``) and talks to the
broker(s) over gRPC/TLS with ``grpc.aio``. The parent drives it over a pipe:

- ``("enroll", None)``: every node of this worker enrolls (own EK + EK certificate + AK,
  StartEnrollment, ActivateCredential, FinishEnrollment); nothing of it is timed.
- ``("attest", name)``: one attestation of one node (to seed the boot policy); answers its result.
- ``("run", RunSpec)``: the timed phase; answers a ``RunReport``.
- ``("stop", None)``: exit.

An attestation is GetNonce -> TPM2_Quote (ContextLoad + Quote + Flush, ~1 ms in this process)
-> Attest; its latency is measured from sending GetNonce to receiving the Attest reply. Both
calls are authenticated as the agent's are: each node derives its node key from the secret its
enrollment's credential activation recovered (``keylease.api.v1.nodeauth``) and sends the MAC over
the exact request bytes in the ``keylease-node-auth`` metadata.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from kbs.tpm.objects import parse_public
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1 import keylease_pb2_grpc as pb_grpc
from keylease.api.v1 import qualifying_data
from keylease.api.v1.nodeauth import ATTEST, GET_NONCE, WATCH, auth_metadata, node_key
from keylease.secret import Secret
from scripts.fleet_ca import EkCa
from scripts.fleet_tpm import FleetTpm, Identity

__all__ = ["RunReport", "RunSpec", "WorkerSpec", "node_name", "worker_main"]

RPC_TIMEOUT = 60.0
MAX_ERROR_SAMPLES = 5


def node_name(index: int) -> str:
    return f"fleet-{index:05d}"


@dataclass(frozen=True)
class WorkerSpec:
    worker: int
    tcti: str
    addresses: tuple[str, ...]  # one per broker replica; node i uses addresses[i % len]
    ca_pem: bytes  # the brokers' agent CA
    ek_ca_key_pem: bytes
    ek_ca_cert_pem: bytes
    nodes: tuple[int, ...]


@dataclass(frozen=True)
class RunSpec:
    mode: str  # "renewal", "storm" or "max"
    start_at: float  # time.time() at which every worker starts
    duration: float  # renewal/max: seconds of load
    period: float  # renewal: seconds between two attestations of one node
    concurrency: int  # storm/max: attestations in flight in this worker
    watch: bool = False  # every node also keeps a Watch stream open, as an agent does (soak)


@dataclass
class RunReport:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    first_start: float = 0.0
    last_end: float = 0.0
    max_lateness: float = 0.0  # renewal: how late (s) the worst attestation started
    watch_events: int = 0  # watch: events received on the nodes' streams

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(text[:300])


class _Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.tpm = FleetTpm(spec.tcti)
        key = load_pem_private_key(spec.ek_ca_key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.ek_ca = EkCa(key, x509.load_pem_x509_certificate(spec.ek_ca_cert_pem))
        self.contexts: dict[str, bytes] = {}  # node name -> saved AK context
        self.keys: dict[str, Secret] = {}  # node name -> node key
        self.banks = [
            pb.PcrBank(
                bank="sha256",
                pcrs=[pb.PcrValue(index=i, value=v) for i, v in sorted(self.tpm.pcrs().items())],
            )
        ]
        self.channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=self.spec.ca_pem)
        )

    def channel(self, index: int) -> grpc.aio.Channel:
        address = self.spec.addresses[index % len(self.spec.addresses)]
        if address not in self.channels:
            self.channels[address] = self._channel(address)
        return self.channels[address]

    def stub(self, index: int) -> pb_grpc.NodeServiceStub:
        return pb_grpc.NodeServiceStub(self.channel(index))

    async def enroll(self) -> tuple[int, list[str]]:
        errors: list[str] = []
        for index in self.spec.nodes:
            name = node_name(index)
            try:
                await self._enroll_one(index, name)
            except (grpc.aio.AioRpcError, ValueError) as exc:
                errors.append(f"{name}: {_describe(exc)}")
        return len(self.contexts), errors

    async def _enroll_one(self, index: int, name: str) -> None:
        ident: Identity = self.tpm.create_identity(index)
        ek_key = parse_public(ident.ek_public, "ek").key
        assert isinstance(ek_key, ec.EllipticCurvePublicKey)
        cert = self.ek_ca.issue_ek_cert(ek_key, serial=index + 1)
        stub = self.stub(index)
        challenge = await stub.StartEnrollment(
            pb.StartEnrollmentRequest(
                node_name=name,
                ek_certificate=cert,
                ek_public=ident.ek_public,
                ak_public=ident.ak_public,
            ),
            timeout=RPC_TIMEOUT,
        )
        secret, context = self.tpm.activate(
            ident, challenge.credential_blob, challenge.encrypted_secret
        )
        await stub.FinishEnrollment(
            pb.FinishEnrollmentRequest(enrollment_id=challenge.enrollment_id, secret=secret),
            timeout=RPC_TIMEOUT,
        )
        self.contexts[name] = context
        self.keys[name] = node_key(secret, name)

    async def _signed(
        self, channel: grpc.aio.Channel, method: str, name: str, request: Any, reply: Any
    ) -> Any:
        """``request`` as node ``name``'s agent sends it: serialized once, MAC over those bytes."""
        raw = request.SerializeToString()
        call = channel.unary_unary(
            method, request_serializer=None, response_deserializer=reply.FromString
        )
        metadata = auth_metadata(self.keys[name], method, name, raw)
        return await call(raw, metadata=metadata, timeout=RPC_TIMEOUT)

    async def attest(self, index: int, channel: grpc.aio.Channel | None = None) -> str:
        """One attestation; returns "released", "pending" or raises AioRpcError."""
        name = node_name(index)
        channel = channel or self.channel(index)
        request = pb.GetNonceRequest(node_name=name)
        reply = await self._signed(channel, GET_NONCE, name, request, pb.GetNonceResponse)
        quote, signature = self.tpm.quote(self.contexts[name], qualifying_data(reply.nonce))
        evidence = pb.AttestRequest(
            node_name=name,
            nonce=reply.nonce,
            quote=quote,
            signature=signature,
            banks=self.banks,
        )
        result = await self._signed(channel, ATTEST, name, evidence, pb.AttestResponse)
        if result.outcome == pb.ATTEST_OUTCOME_RELEASED and result.HasField("release"):
            return "released"
        if result.outcome == pb.ATTEST_OUTCOME_PENDING_APPROVAL:
            return "pending"
        return f"unexpected outcome {result.outcome}"

    async def _timed(
        self, report: RunReport, index: int, channel: grpc.aio.Channel | None = None
    ) -> None:
        t0 = time.time()
        report.first_start = min(report.first_start or t0, t0)
        try:
            outcome = await self.attest(index, channel)
        except grpc.aio.AioRpcError as exc:
            report.error(f"{node_name(index)}: {_describe(exc)}")
            return
        t1 = time.time()
        report.last_end = max(report.last_end, t1)
        if outcome == "released":
            report.latencies.append(t1 - t0)
        else:
            report.error(f"{node_name(index)}: {outcome}")

    async def run(self, spec: RunSpec) -> RunReport:
        report = RunReport()
        watchers = [asyncio.create_task(self._watch(i, report)) for i in self.spec.nodes
                    if spec.watch]  # fmt: skip
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        if spec.mode == "renewal":
            await self._renewal(spec, report)
        elif spec.mode == "storm":
            await self._storm(spec, report)
        else:
            await self._max(spec, report)
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        return report

    async def _watch(self, index: int, report: RunReport) -> None:
        """The node's Watch stream, as an agent keeps it: any end of it is an error (the broker
        ends a stream only when it stops); reopened a second later."""
        name = node_name(index)
        while True:
            request = pb.WatchRequest(node_name=name)
            raw = request.SerializeToString()
            call = self.stub(index).Watch(
                request, metadata=auth_metadata(self.keys[name], WATCH, name, raw)
            )
            try:
                async for _event in call:
                    report.watch_events += 1
                report.error(f"{name}: watch stream ended")
            except grpc.aio.AioRpcError as exc:
                report.error(f"{name}: watch: {_describe(exc)}")
            except asyncio.CancelledError:
                call.cancel()
                raise
            await asyncio.sleep(1.0)

    async def _renewal(self, spec: RunSpec, report: RunReport) -> None:
        """Every node attests every ``period`` s from a random phase, until ``duration`` ends."""
        end = spec.start_at + spec.duration
        rng = random.Random(self.spec.worker)  # noqa: S311 (load phases, not secrets)

        async def node(index: int) -> None:
            due = spec.start_at + rng.uniform(0, spec.period)
            while due < end:
                await asyncio.sleep(max(0.0, due - time.time()))
                report.max_lateness = max(report.max_lateness, time.time() - due)
                await self._timed(report, index)
                due += spec.period

        await asyncio.gather(*(node(i) for i in self.spec.nodes))

    async def _storm(self, spec: RunSpec, report: RunReport) -> None:
        """Every node once, each on a new TLS connection (a booting node), ``concurrency`` at
        once."""
        queue = list(self.spec.nodes)

        async def lane() -> None:
            while queue:
                index = queue.pop()
                address = self.spec.addresses[index % len(self.spec.addresses)]
                async with self._channel(address) as channel:
                    await self._timed(report, index, channel)

        await asyncio.gather(*(lane() for _ in range(spec.concurrency)))

    async def _max(self, spec: RunSpec, report: RunReport) -> None:
        """``concurrency`` loops over this worker's nodes on established channels."""
        end = spec.start_at + spec.duration
        nodes = list(self.spec.nodes)
        position = [0]

        async def lane() -> None:
            while time.time() < end:
                index = nodes[position[0] % len(nodes)]
                position[0] += 1
                await self._timed(report, index)

        await asyncio.gather(*(lane() for _ in range(spec.concurrency)))

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close(None)
        self.tpm.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    os.environ.setdefault("TSS2_LOG", "esys+none")

    async def serve() -> None:
        worker = _Worker(spec)
        try:
            while True:
                command, arg = await asyncio.to_thread(conn.recv)
                answer: Any
                if command == "enroll":
                    answer = await worker.enroll()
                elif command == "attest":
                    index = int(arg)
                    try:
                        answer = await worker.attest(index)
                    except grpc.aio.AioRpcError as exc:
                        answer = _describe(exc)
                elif command == "run":
                    answer = await worker.run(arg)
                else:
                    return
                conn.send(answer)
        finally:
            await worker.close()

    asyncio.run(serve())

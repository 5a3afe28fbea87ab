"""The floor under the broker's CPU per attestation: grpcio's own cost of an empty RPC.

A grpc.aio server in a process of its own serves ``NodeService.GetNonce`` with a constant reply
(no interceptor, no store, no verification) over TLS with the broker's kind of certificate
(``kbs.tls.init_pki``: ECDSA P-256); a client in this process calls it on one established
channel with 1, 8 and 32 calls in flight. Printed: RPCs/s and the server's CPU (utime+stime) per
RPC. An attestation is two RPCs (GetNonce, Attest), so twice this figure is what gRPC, TLS and
asyncio cost before any of keylease's work; compare with ``scripts.bench_fleet``'s "broker CPU
per attestation".

    .venv/bin/python -m scripts.bench_grpc_floor [--calls 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from harness.broker import cpu_seconds
from kbs.tls import init_pki
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1 import keylease_pb2_grpc as pb_grpc

CONCURRENCY = (1, 8, 32)


class _Constant(pb_grpc.NodeServiceServicer):
    async def GetNonce(self, request: pb.GetNonceRequest, context: Any) -> pb.GetNonceResponse:
        return pb.GetNonceResponse(nonce=b"n" * 32, expires_at_unix=1)


def _serve(conn: Connection, key_pem: bytes, cert_pem: bytes) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_NodeServiceServicer_to_server(_Constant(), server)
        port = server.add_secure_port(
            "127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)])
        )
        await server.start()
        conn.send(port)
        await asyncio.to_thread(conn.recv)  # until told to stop
        await server.stop(None)

    asyncio.run(main())


async def _drive(port: int, ca_pem: bytes, in_flight: int, calls: int) -> float:
    creds = grpc.ssl_channel_credentials(ca_pem)
    async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
        stub = pb_grpc.NodeServiceStub(channel)

        async def lane(n: int) -> None:
            for _ in range(n):
                await stub.GetNonce(pb.GetNonceRequest(node_name="floor"), timeout=10)

        await asyncio.gather(*(lane(50) for _ in range(in_flight)))  # warm-up
        start = time.monotonic()
        await asyncio.gather(*(lane(calls // in_flight) for _ in range(in_flight)))
        return time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--calls", type=int, default=4000, help="timed calls per concurrency level")
    args = p.parse_args()
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kl-floor-") as tmp:
        files = init_pki(Path(tmp) / "tls", ["localhost"])
        key_pem, cert_pem = files.server_key.read_bytes(), files.server_cert.read_bytes()
        ca_pem = files.ca_cert.read_bytes()
        chain = cert_pem + ca_pem
        print("empty GetNonce over TLS on one channel (grpc.aio server, no keylease code):")
        for in_flight in CONCURRENCY:
            parent, child = spawn.Pipe()
            proc = spawn.Process(target=_serve, args=(child, key_pem, chain), daemon=True)
            proc.start()
            try:
                port = parent.recv()
                assert proc.pid is not None
                warm = 50 * in_flight
                cpu0 = cpu_seconds(proc.pid)
                wall = asyncio.run(_drive(port, ca_pem, in_flight, args.calls))
                cpu = cpu_seconds(proc.pid) - cpu0
                calls = args.calls // in_flight * in_flight
                # the warm-up's CPU is inside cpu0..cpu as well: count its calls too
                per = cpu / (calls + warm)
                print(
                    f"  {in_flight:2d} in flight: {calls / wall:6.0f} RPCs/s, server CPU "
                    f"{per * 1e6:4.0f} us per RPC ({2 * per * 1e3:.2f} ms per two-RPC attestation)"
                )
            finally:
                parent.send("stop")
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

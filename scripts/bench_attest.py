"""Benchmark: `keylease-agent attest --once` wall time and broker CPU per attestation.

Everything real: an swtpm provisioned with an EK certificate, the broker over TLS on 127.0.0.1 with
SQLite, a granted RSA-3072 key and a PCR policy. Measures:

1. wall time of `keylease-agent attest --once` with an enrolled AK (median, p90 of --runs runs;
   each run is a new process: Python start-up, TLS handshake, quote, release, install);
2. broker CPU seconds per attestation over those runs (from /proc/PID/stat);
3. broker CPU per attestation on one established channel (GetNonce + Attest, --channel-runs; the
   agent's TPM quote runs in this process, so it is not in the broker's CPU figure).

    .venv/bin/python -m scripts.bench_attest [--runs 20] [--channel-runs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from agent.broker import BrokerClient
from agent.config import load_config
from agent.enroll import node_identity
from agent.state import StateDir
from agent.tpm import Tpm
from harness.broker import Broker, agent, write_agent_config
from harness.keys import write_key
from harness.swtpm import Swtpm, SwtpmCa
from keylease.api.v1 import qualifying_data


def must(result: object) -> None:
    if getattr(result, "returncode", 1) != 0:
        raise SystemExit(f"bench: step failed: {result!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--channel-runs", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("TSS2_LOG", "esys+none")  # ESYS prints expected TPM errors otherwise
    with (
        tempfile.TemporaryDirectory(prefix="keylease-bench-") as tmp,
        tempfile.TemporaryDirectory(prefix="keylease-bench-", dir="/dev/shm") as keys,
    ):
        work = Path(tmp)
        ca = SwtpmCa(work / "ca")
        (work / "roots.pem").write_bytes(ca.bundle_pem())
        tpm_dir = work / "tpm"
        tpm_dir.mkdir()
        (tpm_dir / "tpm2-00.permall").write_bytes((ca.golden / "tpm2-00.permall").read_bytes())
        broker = Broker(work / "kbs", work / "roots.pem")
        # One node attests back to back here: lift the per-node rate limit (5/s by default).
        broker.set(rate_limit_node_per_second=0)
        with Swtpm(tpm_dir) as tpm, broker:
            cfg_path = write_agent_config(
                work / "agent.toml",
                broker=broker,
                tcti=tpm.tcti,
                state_dir=work / "state",
                key_dirs=[Path(keys) / "keys"],
                node_name="bench-1",
            )
            if agent(cfg_path, "attest", "--once").returncode != 3:
                raise SystemExit("bench: first attestation did not end pending")
            write_key(work / "k.pem", rsa.generate_private_key(65537, 3072))
            must(broker.kbs("node", "approve", "bench-1", "--label", "role=bench"))
            must(
                broker.kbs(
                    "policy", "set", "p", "--pcrs", "0,1,2,3,4,5,6,7", "--from-node", "bench-1"
                )
            )
            must(broker.kbs("policy", "assign", "p", "--selector", "role=bench"))
            must(broker.kbs("key", "import", "k", "--private-key", str(work / "k.pem")))
            must(broker.kbs("grant", "add", "k", "--selector", "role=bench"))
            must(agent(cfg_path, "attest", "--once"))  # warm: enrolled, key installed

            walls: list[float] = []
            cpu0 = broker.cpu_seconds()
            for _ in range(args.runs):
                t0 = time.perf_counter()
                must(agent(cfg_path, "attest", "--once"))
                walls.append(time.perf_counter() - t0)
            cpu_cli = (broker.cpu_seconds() - cpu0) / args.runs

            cfg = load_config(cfg_path)
            state = StateDir.open(cfg.state_dir)
            ak = state.load_ak()
            assert ak is not None
            with Tpm.open(cfg.tcti) as t, BrokerClient(cfg) as client:
                me = node_identity(cfg, t, state)  # the node key, as the daemon recovers it
                assert me is not None
                client.get_nonce(me)  # establish the channel (TLS handshake)
                cpu1 = broker.cpu_seconds()
                t1 = time.perf_counter()
                for _ in range(args.channel_runs):
                    nonce = client.get_nonce(me)
                    quote = t.quote(ak, qualifying_data(nonce))
                    reply = client.attest(me, nonce, quote, b"")
                    assert reply.release is not None
                elapsed = time.perf_counter() - t1
                cpu_channel = (broker.cpu_seconds() - cpu1) / args.channel_runs
    walls.sort()
    print(f"attest --once wall time over {args.runs} runs (enrolled AK, swtpm, TLS, RSA-3072 key):")
    print(
        f"  median {statistics.median(walls) * 1000:.0f} ms, "
        f"p90 {walls[int(0.9 * (len(walls) - 1))] * 1000:.0f} ms, "
        f"min {walls[0] * 1000:.0f} ms, max {walls[-1] * 1000:.0f} ms"
    )
    print(f"broker CPU per attestation, new process + TLS handshake each: {cpu_cli * 1000:.1f} ms")
    print(
        f"broker CPU per attestation on one channel ({args.channel_runs} Attest calls): "
        f"{cpu_channel * 1000:.2f} ms (GetNonce + Attest); one sequential client with its "
        f"swtpm quotes: {args.channel_runs / elapsed:.0f} attestations/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

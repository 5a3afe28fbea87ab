"""Benchmark the agent daemon: start-to-READY from the sealed cache, and memory under renewals.

Everything real: swtpm with an EK certificate, the broker over TLS, `keylease-agent run` as a
subprocess with a NOTIFY_SOCKET of this script's. Measures:

1. process start -> READY=1 with the keys restored from the sealed cache, broker stopped
   (median / p90 / max of --restarts runs; key files removed before each start, as after a reboot),
   with each number of approvals of --approvals held (the one for the node's state, plus genuine
   approvals signed by the broker's key for other states, which the restore has to look past);
2. the daemon's resident memory (VmRSS) after --renewals lease renewals with a --lease-seconds
   lease (renewal at about two thirds of it), compared with its RSS after the first attestation.

    .venv/bin/python -m scripts.bench_daemon [--restarts 20] [--approvals 1,10,100]
                                             [--renewals 90] [--lease-seconds 3]
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

from agent.keystore import ApprovalStore
from agent.state import StateDir
from harness.broker import Broker, agent, write_agent_config
from harness.daemon import AgentDaemon, NotifySocket
from harness.forge import broker_signer, forged_approval
from harness.keys import write_key
from harness.swtpm import Swtpm, SwtpmCa


def must(result: object) -> None:
    if getattr(result, "returncode", 1) != 0:
        raise SystemExit(f"bench: step failed: {result!r}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("bench: no VmRSS")


def renewals(log: str) -> int:
    return log.count("attested: ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--approvals", default="1", help="approvals held, e.g. 1,10,100")
    parser.add_argument("--renewals", type=int, default=90)
    parser.add_argument("--lease-seconds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TSS2_LOG", "esys+none")
    with (
        tempfile.TemporaryDirectory(prefix="keylease-bench-") as tmp,
        tempfile.TemporaryDirectory(prefix="keylease-bench-", dir="/dev/shm") as keys,
    ):
        work = Path(tmp)
        ca = SwtpmCa(work / "ca")
        (work / "roots.pem").write_bytes(ca.bundle_pem())
        (work / "tpm").mkdir()
        (work / "tpm" / "tpm2-00.permall").write_bytes((ca.golden / "tpm2-00.permall").read_bytes())
        key_dir = Path(keys) / "crio-keys"
        with Swtpm(work / "tpm") as tpm, Broker(work / "kbs", work / "roots.pem") as broker:
            cfg = write_agent_config(
                work / "agent.toml",
                broker=broker,
                tcti=tpm.tcti,
                state_dir=work / "state",
                key_dirs=[key_dir],
                node_name="bench-d",
                extra_lines=["retry_max_seconds = 2"],
            )
            if agent(cfg, "attest", "--once").returncode != 3:
                raise SystemExit("bench: first attestation did not end pending")
            write_key(work / "k.pem", rsa.generate_private_key(65537, 3072))
            for step in (
                ["node", "approve", "bench-d", "--label", "role=bench"],
                ["policy", "set", "p", "--pcrs", "0,1,2,3,4,5,6,7", "--from-node", "bench-d"],
                ["policy", "assign", "p", "--selector", "role=bench"],
                ["key", "import", "k", "--private-key", str(work / "k.pem")],
                ["grant", "add", "k", "--selector", "role=bench"],
            ):
                must(broker.kbs(*step))
            must(agent(cfg, "attest", "--once"))  # the sealed cache now exists

            broker.restart()  # pin the port for the renewal phase
            signer = broker_signer(broker)
            broker.stop()
            store = ApprovalStore(StateDir.open(work / "state"))
            results: dict[int, list[float]] = {}
            for count in (int(n) for n in args.approvals.split(",")):
                extra = count - len(store.load())
                store.merge(
                    (
                        forged_approval(
                            signer,
                            "bench-d",
                            "p",
                            {i: os.urandom(32) for i in range(8)},
                            1 << 40,
                            origin=f"another state {n}",
                        )
                        for n in range(max(0, extra))
                    ),
                    None,
                )
                if len(store.load()) != count:
                    raise SystemExit(f"bench: {len(store.load())} approvals held, not {count}")
                times = results.setdefault(count, [])
                for i in range(args.restarts):
                    for f in (key_dir / "keylease").iterdir():
                        f.unlink()
                    with NotifySocket(work / f"n{count}-{i}.sock") as sock:
                        daemon = AgentDaemon(cfg, work / "restarts.log", sock).start()
                        ready = sock.ready(10)
                        daemon.stop()
                    if ready is None or "1 key" not in ready.fields.get("STATUS", ""):
                        raise SystemExit(f"bench: no READY with keys: {daemon.log()}")
                    times.append(ready.at - daemon.started_at)

            broker.restart(lease_seconds=args.lease_seconds)
            with NotifySocket(work / "r.sock") as sock:
                daemon = AgentDaemon(cfg, work / "renewals.log", sock).start()
                if sock.ready(30) is None:
                    raise SystemExit(f"bench: no READY: {daemon.log()}")
                while renewals(daemon.log()) < 1:
                    time.sleep(0.1)
                first = rss_kib(daemon.pid)
                t0 = time.monotonic()
                while renewals(daemon.log()) < args.renewals + 1:
                    if not daemon.alive():
                        raise SystemExit(f"bench: daemon died: {daemon.log()}")
                    time.sleep(0.5)
                last = rss_kib(daemon.pid)
                elapsed = time.monotonic() - t0
                done = renewals(daemon.log()) - 1
                daemon.stop()
    print(f"start -> READY from the sealed cache, broker stopped, {args.restarts} restarts:")
    for count, times in results.items():
        times.sort()
        print(
            f"  {count:4d} approval(s) held: median {statistics.median(times) * 1000:.0f} ms, "
            f"p90 {times[int(0.9 * (len(times) - 1))] * 1000:.0f} ms, "
            f"max {times[-1] * 1000:.0f} ms"
        )
    print(
        f"RSS: {first / 1024:.1f} MiB after the first attestation, {last / 1024:.1f} MiB after "
        f"{done} renewals ({args.lease_seconds} s lease, {elapsed:.0f} s); "
        f"growth {(last - first) / max(done, 1):.1f} KiB per renewal"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fleet benchmark: N simulated nodes, each with its own TPM identity, against the broker.

Every node has its own EK (the standard ECC P-256 EK template with a distinct ``unique``, created
in an swtpm's endorsement hierarchy), its own EK certificate from a test CA the broker trusts
(``scripts.fleet_ca``) and its own ECC AK under that EK (``scripts.fleet_tpm``). ``--clients``
processes (``scripts.fleet_worker``) each own one swtpm carrying their share of the nodes.
Enrollment, approval (label ``role=bench``), a PCR policy, an RSA-3072 key and its grant are set
up first and not timed; the timed phase is one of:

- ``renewal``: every node attests every ``--period`` s from a random phase for ``--duration`` s
  (default two periods), on established channels;
- ``storm``: every node attests once, each on a new TLS connection, ``--concurrency`` at once per
  client process (a boot storm of already-enrolled nodes);
- ``max``: ``--concurrency`` loops per client on established channels for ``--duration`` s.

Printed: attestations/s, p50/p95/p99 latency (GetNonce sent to Attest reply, including the
client's ~1 ms swtpm quote), broker CPU seconds per attestation (utime+stime of the broker
processes over the timed phase), broker resident memory, errors, and the broker-side latency per
RPC from its own ``keylease_rpc_duration_seconds`` histogram (``scripts.fleet_metrics``). The
broker and the clients share this machine's cores unless ``--broker-cpus`` pins the broker
(``taskset``).

All nodes connect from 127.0.0.1, so the per-peer rate limit and in-flight cap (meant for one
node or one NAT) are lifted for the benchmark; per-node limits stay at their defaults.

    .venv/bin/python -m scripts.bench_fleet --mode renewal --nodes 1000 --period 60
    .venv/bin/python -m scripts.bench_fleet --mode storm --nodes 500
    .venv/bin/python -m scripts.bench_fleet --mode max --nodes 200 --duration 20
    ... --database postgresql://USER:PW@127.0.0.1/DB --replicas 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.broker import Broker
from scripts import fleet_metrics
from scripts.fleet_setup import running_fleet
from scripts.fleet_worker import RunReport, RunSpec

BENCH_LIMITS: dict[str, int | str] = {
    "rate_limit_peer_per_second": 0,  # every simulated node shares 127.0.0.1
    "max_inflight_per_peer": 100_000,
    "max_queued_attestations": 100_000,
}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--mode", choices=("renewal", "storm", "max"), required=True)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--period", type=float, default=60.0, help="renewal: seconds between renewals")
    p.add_argument("--duration", type=float, default=0.0, help="renewal: default 2 periods")
    p.add_argument("--clients", type=int, default=2, help="load-generating processes")
    p.add_argument("--concurrency", type=int, default=8, help="storm/max: in flight per client")
    p.add_argument("--database", default="", help="a postgresql:// URL (default: SQLite)")
    p.add_argument(
        "--postgres",
        action="store_true",
        help="start a private PostgreSQL (harness.postgres: fsync off) and use it",
    )
    p.add_argument("--sqlite-dir", default="", help="put the SQLite file here (e.g. /dev/shm)")
    p.add_argument("--replicas", type=int, default=1, help="brokers (>1 needs --database)")
    p.add_argument("--broker-cpus", default="", help="taskset CPU list for the broker(s)")
    p.add_argument("--keep-limits", action="store_true", help="keep the per-peer limits on")
    p.add_argument(
        "--no-front",
        action="store_true",
        help="gRPC on the listen address itself, without the connection front (to compare)",
    )
    p.add_argument("--py-spy", default="", help="record broker 0 with py-spy (raw) to this file")
    args = p.parse_args()
    if args.replicas > 1 and not (args.database or args.postgres):
        p.error("--replicas > 1 needs --database postgresql://... (replicas share one database)")
    if not args.duration:
        args.duration = 2 * args.period if args.mode == "renewal" else 20.0
    return args


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return "?"


def _py_spy(args: argparse.Namespace, pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
    if not args.py_spy:
        return None
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [
            *(exe, "record", "--pid", str(pid), "--duration", str(int(seconds) + 1)),
            *("--rate", "250", "--format", "raw", "--nonblocking", "-o", args.py_spy),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _print_report(
    args: argparse.Namespace,
    reports: list[RunReport],
    cpu: float,
    wall: float,
    brokers: list[Broker],
    affinity: str,
) -> None:
    lat = sorted(x for r in reports for x in r.latencies)
    errors = sum(r.errors for r in reports)
    done = len(lat)
    starts = [r.first_start for r in reports if r.first_start]
    ends = [r.last_end for r in reports if r.last_end]
    span = (max(ends) - min(starts)) if starts and ends else wall
    db = "PostgreSQL" if args.database else "SQLite"
    print(
        f"mode {args.mode}: {args.nodes} nodes (distinct EKs), {len(brokers)} broker(s) on {db}, "
        f"{args.clients} client processes, broker CPUs: {affinity} of {os.cpu_count()} "
        "(shared with the clients)"
        if not args.broker_cpus
        else f"mode {args.mode}: {args.nodes} nodes, broker pinned to CPUs {args.broker_cpus}"
    )
    if args.mode == "renewal":
        offered = args.nodes / args.period
        lateness = max((r.max_lateness for r in reports), default=0.0)
        print(
            f"  offered load {offered:.1f} attestations/s for {args.duration:.0f} s; "
            f"worst start lateness {lateness * 1000:.0f} ms"
        )
    print(f"  attestations released: {done}, errors: {errors}, in {span:.1f} s")
    print(f"  throughput: {done / span if span else 0:.1f} attestations/s")
    if lat:
        print(
            f"  latency ms: p50 {_percentile(lat, 0.5) * 1000:.1f}, "
            f"p95 {_percentile(lat, 0.95) * 1000:.1f}, p99 {_percentile(lat, 0.99) * 1000:.1f}, "
            f"max {lat[-1] * 1000:.1f}, mean {statistics.fmean(lat) * 1000:.1f}"
        )
    per = cpu / (done + errors) if done + errors else float("nan")
    print(
        f"  broker CPU: {cpu:.2f} s over {wall:.1f} s ({cpu / wall:.2f} cores); "
        f"{per * 1000:.2f} ms per attestation (GetNonce + Attest)"
    )
    for b in brokers:
        print(
            f"  broker pid {b.pid}: RSS {_status(b.pid, 'VmRSS')}, peak {_status(b.pid, 'VmHWM')}"
        )
    for r in reports:
        for text in r.error_samples:
            print(f"  error: {text}")


def _print_broker_latency(parts: list[fleet_metrics.Buckets]) -> None:
    """Per-RPC latency as the broker measured it (no client TPM or load-generator queueing)."""
    merged = fleet_metrics.merge(parts)
    for method in ("GetNonce", "Attest"):
        counts = merged.get(method)
        if not counts:
            continue
        q = {p: fleet_metrics.quantile(counts, p) * 1000 for p in (0.5, 0.95, 0.99)}
        print(
            f"  broker-side {method} ms (histogram bucket bounds): p50 <= {q[0.5]:g}, "
            f"p95 <= {q[0.95]:g}, p99 <= {q[0.99]:g}"
        )


def main() -> int:
    args = _args()
    os.environ.setdefault("TSS2_LOG", "esys+none")
    if not args.postgres:
        return _bench(args)
    from harness.postgres import PostgresServer

    server = PostgresServer()
    server.start()
    try:
        args.database = server.create_database("bench")
        return _bench(args)
    finally:
        server.destroy()


def _bench(args: argparse.Namespace) -> int:
    settings: dict[str, int | str] = {} if args.keep_limits else dict(BENCH_LIMITS)
    if args.no_front:
        settings["max_connections_per_address"] = 0
    if args.database:
        settings["database"] = args.database
    elif args.sqlite_dir:
        settings["database"] = str(Path(tempfile.mkdtemp(dir=args.sqlite_dir)) / "kbs.db")
    with running_fleet(
        args.nodes, args.clients, settings, replicas=args.replicas, broker_cpus=args.broker_cpus
    ) as fleet:
        if fleet.enrolled == 0:
            return 1
        brokers = fleet.brokers
        affinity = ",".join(str(c) for c in sorted(os.sched_getaffinity(brokers[0].pid)))
        run = RunSpec(
            mode=args.mode,
            start_at=time.time() + 1.0,
            duration=args.duration,
            period=args.period,
            concurrency=args.concurrency,
        )
        spy = _py_spy(args, brokers[0].pid, run.duration if args.mode != "storm" else 60)
        hist0 = [fleet_metrics.scrape(m) for m in fleet.metrics]
        cpu0 = sum(b.cpu_seconds() for b in brokers)
        w0 = time.monotonic()
        reports: list[RunReport] = fleet.ask("run", run)
        wall = time.monotonic() - w0 - 1.0
        cpu = sum(b.cpu_seconds() for b in brokers) - cpu0
        _print_report(args, reports, cpu, wall, brokers, affinity)
        _print_broker_latency(
            [
                fleet_metrics.subtract(fleet_metrics.scrape(m), before)
                for m, before in zip(fleet.metrics, hist0, strict=True)
            ]
        )
        if spy is not None:
            spy.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

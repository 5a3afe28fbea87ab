"""Soak: simulated agents against one broker for a long while, with the floods of issue 10 running.

    .venv/bin/python -m scripts.soak --agents 1000 --duration 600
    .venv/bin/python -m scripts.soak --agents 100 --duration 60 --period 20 --clients 1   # CI

Agents: ``scripts.fleet_worker`` nodes (each its own EK, EK certificate and AK, in ``--clients``
processes), all from 127.0.0.1. Each keeps a Watch stream open, as the agent does, and attests
every ``--period`` seconds from a random phase (GetNonce, TPM2_Quote, Attest, the release).
Every failed RPC and every Watch stream that ends is an agent error.

Floods, each from its own client address for the whole run (``harness.floods``):

- attack 3, from 127.0.0.4: 16,640 grpc.health.v1 Health/Watch streams opened in batches, held
  for 20 s, then opened again, over and over;
- attack 4, from 127.0.0.3: 1,300 TCP connections that never start TLS, those the broker
  closes replaced every second; the broker runs with ``--nofile`` descriptors (default 1,024,
  fewer than the flood's connections);
- strangers, from 127.0.0.5: GetNonce and StartEnrollment for names that are not enrolled, at
  ``--stranger-rate`` per second (refusals that must not grow the audit log).

Printed: attestations and their p50/p95/p99 latency, agent errors, the broker's resident memory
sampled every 5 s and its slope (least squares over the run after the first tenth), broker CPU,
what each flood achieved, and the audit rows written against the attestations made. Exit status
0 only with 0 agent errors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc

from harness.floods import HealthWatchFlood, IdleConnectionFlood
from harness.netops import SourceProxy, node_stub, scrape, secure_channel
from keylease.api.v1 import keylease_pb2 as pb
from scripts.fleet_setup import running_fleet
from scripts.fleet_worker import RunReport, RunSpec

__all__ = ["main"]

SAMPLE_SECONDS = 5.0
HEALTH_STREAMS = 16_640
HEALTH_HOLD_SECONDS = 20.0
IDLE_CONNECTIONS = 1_300
IDLE_REFILL_SECONDS = 1.0  # the idle flood replaces what the broker closed once a second


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--duration", type=float, default=600.0, help="seconds")
    p.add_argument("--period", type=float, default=60.0, help="seconds between attestations")
    p.add_argument("--clients", type=int, default=2, help="agent-simulating processes")
    p.add_argument("--nofile", type=int, default=1024, help="the broker's RLIMIT_NOFILE")
    p.add_argument("--stranger-rate", type=float, default=20.0, help="stranger requests/s")
    return p.parse_args(argv)


class Sampler(threading.Thread):
    """The broker's resident memory (kB) every ``SAMPLE_SECONDS``."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
        self.stopping = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stopping.is_set():
            self.samples.append((time.monotonic() - start, _rss_mib(self.pid)))
            self.stopping.wait(SAMPLE_SECONDS)

    def slope_mib_per_minute(self, start: float = 0.1, end: float = 1.0) -> float:
        """Least-squares slope over the part of the run from ``start`` to ``end`` (fractions;
        by default after the first tenth, the warm-up)."""
        if len(self.samples) < 3:
            return float("nan")
        first, span = self.samples[0][0], self.samples[-1][0] - self.samples[0][0]
        points = [(t, m) for t, m in self.samples
                  if first + start * span <= t <= first + end * span]  # fmt: skip
        if len(points) < 2:
            return float("nan")
        ts, ms = [t for t, _ in points], [m for _, m in points]
        return statistics.linear_regression(ts, ms).slope * 60

    def at(self, fraction: float) -> float:
        """RSS (MiB) at ``fraction`` of the run."""
        return self.samples[min(len(self.samples) - 1, int(fraction * len(self.samples)))][1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class HealthFlooding(threading.Thread):
    """Attack 3, over and over: open the streams, hold them, let go, open them again."""

    def __init__(self, address: str, ca: Path) -> None:
        super().__init__(daemon=True)
        self.proxy = SourceProxy(address, "127.0.0.4")
        self.ca = ca
        self.rounds = 0
        self.held = 0  # most streams held at once
        self.refused = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            flood = HealthWatchFlood(self.proxy.address, self.ca, HEALTH_STREAMS)
            with contextlib.suppress(TimeoutError):  # a slow round still counts
                flood.start(timeout=300)
            self.rounds += 1
            self.held = max(self.held, flood.outcomes["open"])
            self.refused += sum(n for k, n in flood.outcomes.items() if k != "open")
            self.stopping.wait(HEALTH_HOLD_SECONDS)
            flood.stop()

    def stop(self) -> None:
        self.stopping.set()
        self.join(120)
        self.proxy.close()


class Strangers(threading.Thread):
    """GetNonce and StartEnrollment for names the broker does not know, at ``rate``/s."""

    def __init__(self, address: str, ca: Path, rate: float) -> None:
        super().__init__(daemon=True)
        self.proxy = SourceProxy(address, "127.0.0.5")
        self.ca = ca
        self.rate = rate
        self.sent = 0
        self.codes: dict[str, int] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        with secure_channel(self.proxy.address, self.ca) as channel:
            stub = node_stub(channel)
            while not self.stopping.wait(1 / self.rate):
                name = f"stranger-{self.sent}"
                try:
                    if self.sent % 5:
                        stub.GetNonce(pb.GetNonceRequest(node_name=name), timeout=10)
                    else:
                        stub.StartEnrollment(
                            pb.StartEnrollmentRequest(node_name=name, ek_certificate=b"x",
                                                      ek_public=b"y", ak_public=b"z"),
                            timeout=10,
                        )  # fmt: skip
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                self.sent += 1
                self.codes[code] = self.codes.get(code, 0) + 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        self.proxy.close()


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("TSS2_LOG", "esys+none")
    with running_fleet(args.agents, args.clients, {}, nofile=args.nofile) as fleet:
        if fleet.enrolled != args.agents:
            return 1
        broker = fleet.brokers[0]
        audit0 = _audit_rows(broker.directory / "kbs.db")
        idle = IdleConnectionFlood(
            broker.address, IDLE_CONNECTIONS, source="127.0.0.3", period=IDLE_REFILL_SECONDS
        ).start()
        health = HealthFlooding(broker.address, broker.ca)
        health.start()
        strangers = Strangers(broker.address, broker.ca, args.stranger_rate)
        strangers.start()
        sampler = Sampler(broker.pid)
        sampler.start()
        cpu0 = broker.cpu_seconds()
        print(f"soak: {args.agents} agents for {args.duration:.0f} s (every {args.period:g} s, a "
              f"Watch stream each), floods running; broker fd limit {args.nofile}")  # fmt: skip
        try:
            run = RunSpec(mode="renewal", start_at=time.time() + 1.0, duration=args.duration,
                          period=args.period, concurrency=0, watch=True)  # fmt: skip
            reports: list[RunReport] = fleet.ask("run", run)
        finally:
            cpu = broker.cpu_seconds() - cpu0
            sampler.stopping.set()
            health.stop()
            strangers.stop()
            idle.stop()
        metrics = scrape(fleet.metrics[0])
        alive = broker._proc is not None and broker._proc.poll() is None
        audit = _audit_rows(broker.directory / "kbs.db") - audit0
    return _report(args, reports, sampler, cpu, health, idle, strangers, metrics, audit, alive)


def _report(
    args: argparse.Namespace,
    reports: list[RunReport],
    sampler: Sampler,
    cpu: float,
    health: HealthFlooding,
    idle: IdleConnectionFlood,
    strangers: Strangers,
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float],
    audit: int,
    alive: bool,
) -> int:
    latencies = sorted(x for r in reports for x in r.latencies)
    errors = sum(r.errors for r in reports)
    events = sum(r.watch_events for r in reports)
    rss = [m for _, m in sampler.samples]

    def counted(name: str) -> float:
        return sum(v for (n, _), v in metrics.items() if n == name)

    print(f"  attestations released: {len(latencies)}; agent errors: {errors}; watch events: "
          f"{events}; broker alive at the end: {alive}")  # fmt: skip
    if latencies:
        ms = [x * 1000 for x in latencies]
        print(f"  latency ms: p50 {_percentile(ms, 0.5):.1f}, p95 {_percentile(ms, 0.95):.1f}, "
              f"p99 {_percentile(ms, 0.99):.1f}, max {ms[-1]:.1f}")  # fmt: skip
    if rss:
        slope = sampler.slope_mib_per_minute()
        quarters = ", ".join(f"{sampler.at(q):.1f}" for q in (0.25, 0.5, 0.75))
        print(f"  broker RSS MiB: start {rss[0]:.1f}, at 1/4, 1/2, 3/4 {quarters}, end "
              f"{rss[-1]:.1f}; slope {slope:+.3f} MiB/min after the first tenth, "
              f"{sampler.slope_mib_per_minute(0.5):+.3f} over the second half "
              f"({len(rss)} samples)")  # fmt: skip
    print(f"  broker CPU: {cpu:.1f} s ({cpu / args.duration:.2f} cores)")
    print(f"  health flood: {health.rounds} rounds of {HEALTH_STREAMS} streams, at most "
          f"{health.held} held at once, {health.refused} refused")  # fmt: skip
    print(f"  idle flood: {idle.opened} connections opened, {idle.closed_by_peer} closed by the "
          f"broker, {idle.open_now} open at the end")  # fmt: skip
    print(f"  strangers: {strangers.sent} requests {strangers.codes}; audit rows written "
          f"{audit} for {len(latencies)} attestations; unproven refusals counted "
          f"{counted('keylease_unproven_refusals_total'):.0f}")  # fmt: skip
    print(
        f"  connections refused {counted('keylease_connections_refused_total'):.0f}, "
        f"requests refused by a limit {counted('keylease_requests_limited_total'):.0f}"
    )
    for r in reports:
        for text in r.error_samples:
            print(f"  agent error: {text}")
    return 0 if errors == 0 and alive and latencies else 1


def _audit_rows(database: Path) -> int:
    from kbs.store import Store

    with Store.open(database) as store:
        return len(store.list_audit(limit=10_000_000))


if __name__ == "__main__":
    sys.exit(main())

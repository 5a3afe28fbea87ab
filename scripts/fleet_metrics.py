"""Broker-side latency for the fleet benchmark, from the broker's own Prometheus histogram.

The client-side latency in ``scripts.bench_fleet`` includes the client's swtpm quote and any
queueing in the load generator; ``keylease_rpc_duration_seconds`` is what the broker spent on
each RPC, from admission to answer. Quantiles are bucket upper bounds (the histogram's
resolution: 1, 2.5, 5, 10, 25, 50, 100 ms, ...).
"""

from __future__ import annotations

import math
import socket
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Buckets", "free_port", "quantile", "scrape", "subtract"]

HISTOGRAM = "keylease_rpc_duration_seconds"

Buckets = dict[str, dict[float, float]]  # method -> upper bound -> cumulative count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(address: str) -> Buckets:
    """The cumulative bucket counts per method from one broker's ``/metrics``."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found: Buckets = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        if family.name != HISTOGRAM:
            continue
        for sample in family.samples:
            if sample.name == f"{HISTOGRAM}_bucket":
                found[sample.labels["method"]][float(sample.labels["le"])] = sample.value
    return dict(found)


def subtract(after: Buckets, before: Buckets) -> Buckets:
    return {
        method: {le: n - before.get(method, {}).get(le, 0.0) for le, n in counts.items()}
        for method, counts in after.items()
    }


def merge(parts: list[Buckets]) -> Buckets:
    total: Buckets = defaultdict(dict)
    for part in parts:
        for method, counts in part.items():
            for le, n in counts.items():
                total[method][le] = total[method].get(le, 0.0) + n
    return dict(total)


def quantile(counts: dict[float, float], q: float) -> float:
    """The smallest bucket bound holding at least ``q`` of the observations (inf if none)."""
    total = counts.get(math.inf, 0.0)
    if not total:
        return math.nan
    for le in sorted(counts):
        if counts[le] >= q * total:
            return le
    return math.inf

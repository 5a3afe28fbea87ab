"""Broker-side latency for the fleet benchmark, from the broker's own Prometheus histogram.

The client-side latency in ``scripts.bench_fleet`` includes the client's swtpm quote and any
queueing in the load generator; ``keylease_rpc_duration_seconds`` is what the broker spent on
each RPC, from admission to answer. Quantiles are bucket upper bounds (the histogram's
resolution: 1, 2.5, 5, 10, 25, 50, 100 ms, ...). The scraping is ``harness.netops``'.
"""

from __future__ import annotations

import math
from collections import defaultdict

from harness.netops import scrape as scrape_samples

__all__ = ["Buckets", "merge", "quantile", "scrape", "subtract"]

HISTOGRAM = "keylease_rpc_duration_seconds"

Buckets = dict[str, dict[float, float]]  # method -> upper bound -> cumulative count


def scrape(port: int) -> Buckets:
    """The cumulative bucket counts per method from the broker's ``/metrics`` on ``port``."""
    found: Buckets = defaultdict(dict)
    for (name, labels), value in scrape_samples(port).items():
        if name == f"{HISTOGRAM}_bucket":
            label = dict(labels)
            found[label["method"]][float(label["le"])] = value
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

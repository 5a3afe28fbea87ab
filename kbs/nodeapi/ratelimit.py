"""Token buckets and in-flight counters keyed by client address or node name, and the map from a
relayed connection to the client address behind it.

All are used from the event loop only (no locks). Memory is bounded: at most ``max_keys`` keys
are tracked, the least recently used one being forgotten first (forgetting a bucket only ever
gives that key a fresh burst, and the per-peer limit bounds what a peer can do with that).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["InflightCounter", "PeerMap", "TokenBuckets", "peer_host"]

MAX_KEYS = 65_536


def peer_host(peer: str) -> str:
    """The address part of gRPC's ``context.peer()``: ``ipv4:1.2.3.4:5`` -> ``1.2.3.4``,
    ``ipv6:[::1]:5`` -> ``::1``; anything else (``unix:...``) is kept whole."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] or rest
        return host.strip("[]")
    return peer


class PeerMap:
    """The client address behind each connection the connection front (``kbs.nodeapi.front``)
    relays to gRPC, keyed by the relay's local port on the loopback address: gRPC sees every
    relayed connection as ``ipv4:127.0.0.1:PORT``; ``host`` turns that back into the client's
    address so that per-peer limits count real clients. A peer that is not a relayed connection
    (no front, or a local process talking to the loopback listener directly) is its own host."""

    def __init__(self) -> None:
        self._ports: dict[int, tuple[str, object]] = {}  # port -> (host, the relay that owns it)

    def add(self, port: int, host: str, owner: object) -> None:
        self._ports[port] = (host, owner)

    def remove(self, port: int, owner: object) -> None:
        """Forget ``port`` if ``owner`` still holds it (a new relay may reuse a closed port)."""
        if self._ports.get(port, ("", None))[1] is owner:
            del self._ports[port]

    def host(self, peer: str) -> str:
        if self._ports and peer.startswith("ipv4:127.0.0.1:"):
            port = peer.rpartition(":")[2]
            if port.isdigit():
                return self._ports.get(int(port), ("127.0.0.1", None))[0]
        return peer_host(peer)

    def __len__(self) -> int:
        return len(self._ports)


class TokenBuckets:
    """One token bucket per key: ``burst`` tokens, refilled at ``rate`` per second."""

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, t)

    def take(self, key: str) -> float:
        """Take one token: 0.0 if granted, else the seconds until one is available."""
        now = self._clock()
        tokens, then = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


class InflightCounter:
    """Unfinished requests (or open streams) per key, at most ``limit`` each and, if given,
    ``total`` over all keys."""

    def __init__(self, limit: int, total: int | None = None) -> None:
        self.limit = limit
        self.total_limit = total
        self.total = 0
        self._counts: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        count = self._counts.get(key, 0)
        if count >= self.limit:
            return False
        if self.total_limit is not None and self.total >= self.total_limit:
            return False
        self._counts[key] = count + 1
        self.total += 1
        return True

    def release(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count < 0:
            return
        self.total -= 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

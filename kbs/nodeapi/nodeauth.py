"""Node calls prove the node's identity: the broker side of ``keylease.api.v1.nodeauth``.

``NodeAuthenticator.verify`` checks a call's ``keylease-node-auth`` metadata against the node key
stored for the node it names (``kbs.nodekeys``). The admission interceptor
(``kbs.nodeapi.admission``) calls it for GetNonce, Attest and Watch before any per-node work —
before the node's rate budget is charged, a nonce issued or a watch subscription made. A missing
or garbled header, a header naming another node than the request, an unknown node and a wrong MAC
are one answer (False, then UNAUTHENTICATED "node call not authenticated"); an unknown node costs
the same HMAC as a known one, so neither answer nor timing tells a stranger whether a node exists.

Node keys are cached in memory (a bounded LRU, misses included) so a call costs one HMAC, not a
database read. An entry is dropped when the node enrolls here (``forget``) or when the change
feed reports a change for the node (an enrollment on another replica records one); and a MAC
that does not verify against an entry older than ``RELOAD_AFTER`` seconds re-reads the key once,
so a replica that missed the feed for a moment still accepts a freshly enrolled node. Database
errors propagate (the caller answers UNAVAILABLE), so an outage never looks like "enroll again".
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from keylease.api.v1.nodeauth import AUTH_METADATA_KEY, call_mac, parse_auth_header
from keylease.secret import Secret
from keylease.text import printable

__all__ = [
    "MAX_CACHED_KEYS",
    "REFUSED_TEXT",
    "RELOAD_AFTER",
    "KeyLoader",
    "Metadata",
    "NodeAuthenticator",
]

log = logging.getLogger(__name__)

MAX_CACHED_KEYS = 65_536
RELOAD_AFTER = 1.0  # seconds before a failed verification may re-read the node's key
REFUSAL_LOG_INTERVAL = 10.0  # at most one log line about refused calls per this many seconds
REFUSED_TEXT = "node call not authenticated"
_NO_KEY = Secret(bytes(32))  # stands in for an unknown node's key: the same work, never a match

Metadata = Sequence[tuple[str, str | bytes]]
KeyLoader = Callable[[str], Secret | None]
"""The stored key of a node, None if there is none (``kbs.nodekeys.stored_node_key``)."""


class NodeAuthenticator:
    def __init__(
        self,
        load: KeyLoader,
        *,
        inline: bool,
        max_entries: int = MAX_CACHED_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``inline``: call ``load`` on the event loop (SQLite) rather than in a worker thread."""
        self._load = load
        self._inline = inline
        self._max = max_entries
        self._clock = clock
        self._keys: OrderedDict[str, tuple[Secret | None, float]] = OrderedDict()
        self._refused = 0
        self._refusal_logged = 0.0

    async def verify(self, method: str, metadata: Metadata | None, name: str, raw: bytes) -> bool:
        """True if the call (full method path, its metadata, the node name its request carries
        and its serialized request) comes from that node. Raises what ``load`` raises (StoreError
        when the database cannot be read)."""
        values = [v for k, v in metadata or () if k == AUTH_METADATA_KEY]
        if len(values) != 1 or not isinstance(values[0], str):
            return False
        parsed = parse_auth_header(values[0])
        if parsed is None or parsed[0] != name:
            return False
        mac = parsed[1]
        key, loaded_at = await self._key(name)
        if _matches(key, method, name, raw, mac):
            return True
        if self._clock() - loaded_at < RELOAD_AFTER:
            return False
        key, _ = await self._key(name, reload=True)
        return _matches(key, method, name, raw, mac)

    def forget(self, name: str) -> None:
        """Drop the cached key of ``name`` (it enrolled, or the change feed names it)."""
        self._keys.pop(name, None)

    def refused(self, peer: str, method: str) -> None:
        """Count a refused call; log a summary at most every ``REFUSAL_LOG_INTERVAL`` s."""
        self._refused += 1
        now = self._clock()
        if now - self._refusal_logged < REFUSAL_LOG_INTERVAL:
            return
        log.info(
            "refused %d unauthenticated node call(s) since the last report; the latest: %s from %s",
            self._refused,
            method.rpartition("/")[2],
            printable(peer, 80),
        )
        self._refused = 0
        self._refusal_logged = now

    async def _key(self, name: str, reload: bool = False) -> tuple[Secret | None, float]:
        cached = None if reload else self._keys.get(name)
        if cached is not None:
            self._keys.move_to_end(name)
            return cached
        loaded_at = self._clock()
        if self._inline:
            key = self._load(name)
        else:
            key = await asyncio.to_thread(self._load, name)
        self._keys[name] = (key, loaded_at)
        self._keys.move_to_end(name)
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)
        return key, loaded_at


def _matches(key: Secret | None, method: str, name: str, raw: bytes, mac: bytes) -> bool:
    expected = call_mac(key or _NO_KEY, method, name, raw)
    return hmac.compare_digest(expected, mac) and key is not None

"""The broker's change feed: one task reads new change rows and fans them out to Watch streams.

Operator commands (often another process) write rows to the ``changes`` table
(``kbs.store.changes``). ``ChangeFeed`` polls ``Store.changes_since`` every ``POLL_INTERVAL``
seconds in a worker thread, starting from the newest id at start-up, and hands each change to
the subscriptions it concerns: the named node's, or every one for a change without a node.

Each subscription has a small bounded queue. A subscriber too slow to keep up never blocks the
others: when its queue is full, the queue's content is folded into one notice (REVOKED if any
pending notice was a revocation, CHANGED otherwise, carrying every approval the folded notices
carried, at most ``MAX_FOLDED_PAYLOAD`` bytes of them) — the agent acts on a notice, not on a
count.

Listeners (``listen``) see every change as it is dispatched: the node authenticator drops the
cached key of a node that changed (an enrollment on another replica records a change).

Limits: at most ``MAX_WATCHERS`` subscriptions; at most ``MAX_PER_NODE`` per node name, the
oldest being closed when a newer one arrives (an agent that reconnects after a network break
displaces its own stale stream). Closing the feed closes every subscription, so Watch streams end
promptly when the broker stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kbs.errors import FeedClosed, KbsError, TooManyWatchers
from kbs.model import Change, ChangeKind
from kbs.store import Store
from kbs.store.changes import MAX_CHANGES_PER_READ

__all__ = [
    "MAX_PER_NODE",
    "MAX_WATCHERS",
    "POLL_INTERVAL",
    "QUEUE_SIZE",
    "ChangeFeed",
    "Notice",
    "Subscription",
]

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
QUEUE_SIZE = 16
MAX_WATCHERS = 16384  # a 10,000-node fleet keeps one watch stream per node
MAX_PER_NODE = 4
MAX_FOLDED_PAYLOAD = 1 << 20  # approvals kept when notices fold (its next release has them too)
_STOP_WAIT = 2.0


@dataclass(frozen=True)
class Notice:
    """What one watching node is told: revoked, or attest again."""

    kind: ChangeKind
    reason: str
    payload: bytes | None = None  # approvals for the node (an ApprovalList), if any


class Subscription:
    """One Watch stream's inbox. ``next()`` returns a notice, None on timeout, or raises
    ``FeedClosed`` once the subscription is closed (``closed_because`` says why)."""

    def __init__(self, node: str, size: int = QUEUE_SIZE) -> None:
        self.node = node
        self.closed_because = ""
        self._queue: asyncio.Queue[Notice | None] = asyncio.Queue(size)

    @property
    def closed(self) -> bool:
        return bool(self.closed_because)

    def offer(self, notice: Notice) -> None:
        """Queue ``notice`` without ever waiting; a full queue is folded into one notice."""
        if self.closed:
            return
        try:
            self._queue.put_nowait(notice)
            return
        except asyncio.QueueFull:
            pending = [notice, *self._drain()]
        revoked = [n for n in pending if n.kind is ChangeKind.REVOKED]
        payload = b"".join(n.payload for n in pending if n.payload)  # ApprovalLists concatenate
        kept = payload if len(payload) <= MAX_FOLDED_PAYLOAD else None
        folded = revoked[0] if revoked else Notice(ChangeKind.CHANGED, "several changes", kept)
        self._queue.put_nowait(folded)
        log.debug("watch node=%s: slow reader, %d notices folded", self.node, len(pending))

    def close(self, because: str) -> None:
        """End the subscription: a waiting ``next()`` raises FeedClosed at once. Idempotent."""
        if self.closed:
            return
        self.closed_because = because
        self._drain()
        self._queue.put_nowait(None)

    async def next(self, timeout: float) -> Notice | None:
        if self.closed and self._queue.empty():
            raise FeedClosed(self.closed_because)
        try:
            notice = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        if notice is None:
            raise FeedClosed(self.closed_because)
        return notice

    def _drain(self) -> list[Notice]:
        drained: list[Notice] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                drained.append(item)
        return drained


class ChangeFeed:
    """Polls the store's change rows and fans them out; ``start()`` / ``stop()`` with the server."""

    def __init__(
        self,
        store: Store,
        *,
        interval: float = POLL_INTERVAL,
        max_watchers: int = MAX_WATCHERS,
        max_per_node: int = MAX_PER_NODE,
    ) -> None:
        self._store = store
        self._interval = interval
        self._max_watchers = max_watchers
        self._max_per_node = max_per_node
        self._subs: dict[str, list[Subscription]] = {}
        self._count = 0
        self._last = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._closed = ""
        self._listeners: list[Callable[[Change], None]] = []

    @property
    def watchers(self) -> int:
        return self._count

    async def start(self) -> None:
        """Begin after the newest change recorded so far (older ones are history)."""
        self._last = await asyncio.to_thread(self._store.last_change_id)
        self._task = asyncio.create_task(self._run(), name="keylease-change-feed")
        self._task.add_done_callback(self._finished)
        log.debug("change feed started after change %d", self._last)

    async def stop(self) -> None:
        """Close every subscription and stop polling (bounded: one read in flight at most)."""
        self._close_all("the broker is stopping")
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, _STOP_WAIT)

    def subscribe(self, node: str) -> Subscription:
        """A new subscription for ``node``; FeedClosed if stopping, TooManyWatchers if full."""
        if self._closed:
            raise FeedClosed(f"{self._closed}; reconnect later")
        mine = self._subs.setdefault(node, [])
        while len(mine) >= self._max_per_node:
            self._remove(mine[0], "a newer watch stream for this node replaced it")
            mine = self._subs.setdefault(node, [])
        if self._count >= self._max_watchers:
            raise TooManyWatchers(
                f"the broker already serves {self._count} watch streams (limit "
                f"{self._max_watchers}); retry later"
            )
        sub = Subscription(node)
        mine.append(sub)
        self._count += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove a subscription (idempotent), e.g. when its stream ends."""
        self._remove(sub, "the watch stream ended")

    def _remove(self, sub: Subscription, because: str) -> None:
        sub.close(because)
        mine = self._subs.get(sub.node, [])
        if sub in mine:
            mine.remove(sub)
            self._count -= 1
        if not mine:
            self._subs.pop(sub.node, None)

    def _close_all(self, because: str) -> None:
        self._closed = self._closed or because
        for mine in list(self._subs.values()):
            for sub in list(mine):
                self._remove(sub, because)

    def listen(self, listener: Callable[[Change], None]) -> None:
        """Call ``listener`` with every change dispatched from now on (on the event loop)."""
        self._listeners.append(listener)

    def dispatch(self, changes: Sequence[Change]) -> None:
        """Hand ``changes`` to the listeners and to the subscriptions they concern (the poller
        calls this)."""
        for change in changes:
            for listener in self._listeners:
                listener(change)
            notice = Notice(change.kind, change.reason, change.payload)
            if change.node is None:
                targets = [s for mine in self._subs.values() for s in mine]
            else:
                targets = list(self._subs.get(change.node, ()))
            for sub in targets:
                sub.offer(notice)
            log.debug(
                "change %d %s node=%s -> %d watchers",
                change.id,
                change.kind.value,
                change.node or "*",
                len(targets),
            )

    async def _run(self) -> None:
        failing = False
        while not self._stopping.is_set():
            changes: list[Change] = []
            try:
                changes = await asyncio.to_thread(self._store.changes_since, self._last)
            except KbsError as exc:
                if not failing:
                    log.warning("change feed cannot read the database: %s; retrying", exc)
                failing = True
            else:
                if failing:
                    log.info("change feed reads the database again")
                failing = False
            if changes:
                self._last = changes[-1].id
                self.dispatch(changes)
            if len(changes) < MAX_CHANGES_PER_READ:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._interval)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("change feed failed; watch streams end", exc_info=task.exception())
        self._close_all("the broker's change feed stopped")

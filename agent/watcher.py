"""The broker's watch stream, followed on its own thread: revocations and changes, pushed.

Events are hints that wake the agent's loop: REVOKED removes the keys at once, CHANGED makes it
attest again (and the approvals a widened policy pushes with it go to ``approvals``, which keeps
them once checked); so does each (re)opened stream, since changes made while no stream was open
are not replayed. Trust still comes only from attestation; the stream itself is authenticated with
the node's key, so only this node can open (or displace) it, and a REVOKED on it comes from the
broker. Until the node has a key (not enrolled yet) no stream is opened; a stream refused
UNAUTHENTICATED wakes the loop too, which enrolls again. The stream is re-opened with backoff
after any failure (broker down, credentials refused).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from agent.blobs import NodeIdentity
from agent.broker import BrokerClient, WatchKind, WatchStream
from agent.config import AgentConfig
from agent.errors import AgentError, NodeUnknown, NotAuthenticated
from keylease.api.v1.approvals import Approval

__all__ = ["Watcher"]

log = logging.getLogger(__name__)

W = TypeVar("W")
RETRY_MAX = 30.0


class Watcher(Generic[W]):
    def __init__(
        self,
        config: Callable[[], AgentConfig],
        identity: Callable[[], NodeIdentity | None],
        post: Callable[[W], None],
        *,
        revoked: W,
        changed: W,
        approvals: Callable[[tuple[Approval, ...]], None] = lambda _pushed: None,
    ) -> None:
        self._config, self._identity, self._post = config, identity, post
        self._revoked, self._changed = revoked, changed
        self._approvals = approvals
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._thread = threading.Thread(target=self._run, name="keylease-watch", daemon=True)
        self._rng = random.Random()  # noqa: S311 (jitter, not security)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.restart()

    def restart(self) -> None:
        """End the current stream; the thread re-opens it with the current config."""
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            cfg = self._config()
            identity = self._identity()
            if identity is None or identity.node_name != cfg.node_name:
                self._stop.wait(1.0)  # the loop enrolls or recovers the key first
                continue
            try:
                with BrokerClient(cfg) as client:
                    stream = client.watch(identity)
                    with self._lock:
                        self._stream = stream
                    if self._stop.is_set():
                        stream.cancel()
                    opened = True
                    for event in stream:
                        delay = 1.0
                        if event.approvals:
                            self._approvals(event.approvals)
                        if event.kind is WatchKind.REVOKED:
                            self._post(self._revoked)
                        elif event.kind is WatchKind.CHANGED or opened:
                            # The broker's first event means "subscribed"; changes made before
                            # it are not replayed, so attest once to catch up.
                            self._post(self._changed)
                        opened = False
            except NotAuthenticated as exc:
                log.info("watch: %s", exc)
                self._post(self._changed)  # the loop's next attempt enrolls again
            except NodeUnknown:
                log.debug("watch: the broker does not know node %s yet", cfg.node_name)
            except AgentError as exc:
                log.debug("watch stream ended: %s", exc)
            finally:
                with self._lock:
                    self._stream = None
            delay = min(RETRY_MAX, delay * 2)
            self._stop.wait(delay * self._rng.uniform(0.5, 1.0))

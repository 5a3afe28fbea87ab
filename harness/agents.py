"""The agents a test runs: ``keylease-agent run`` for a node, as often as the test starts one,
each run with its own notify socket and log (``notify-N.sock``, ``agent-N.log``); ``close``
kills whatever still runs (a test's fixture calls it at teardown)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from harness.daemon import AgentDaemon, NotifySocket
from harness.nodes import Node

__all__ = ["Agents"]


class Agents:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[tuple[AgentDaemon, NotifySocket]] = []

    def run(
        self,
        node: Node,
        wrapper: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        probe: Callable[[], object] = lambda: None,
    ) -> tuple[AgentDaemon, NotifySocket]:
        """Start ``keylease-agent run`` on ``node``'s configuration (written first), under
        ``wrapper`` (``strace …``, ``faketime …``) with ``env`` added; ``probe`` runs at each
        sd_notify message (e.g. to see which key files exist at READY)."""
        n = len(self.started)
        node.write_config()
        sock = NotifySocket(self.directory / f"notify-{n}.sock", probe=probe)
        daemon = AgentDaemon(
            node.config_path, self.directory / f"agent-{n}.log", sock, wrapper, env
        )
        self.started.append((daemon, sock))
        return daemon.start(), sock

    def socket(self, daemon: AgentDaemon) -> NotifySocket:
        return next(s for d, s in self.started if d is daemon)

    def close(self) -> None:
        for daemon, sock in self.started:
            daemon.kill()
            sock.close()

"""`keylease-agent run`, the node agent as a systemd service.

- ``loop``: ``Daemon``: signals, the worker loop, watch/network/reload wakes, each attempt;
- ``restore``: keys back from the sealed cache at start-up, before the network;
- ``schedule``: when to attest next (renewal, backoff, a busy broker's hint).
"""

from agent.daemon.loop import Daemon, Wake

__all__ = ["Daemon", "Wake"]

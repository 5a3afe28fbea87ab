"""`keylease-agent run`, the node agent as a systemd service.

- ``loop``: ``Daemon``: signals, the worker loop, watch/network/reload wakes, each attempt;
- ``restore``: keys back from the sealed cache at start-up, before the network;
- ``schedule``: when to attest next (renewal, backoff, a busy broker's hint);
- ``lease``: the lease, measured on the monotonic clock and the TPM's, never the wall clock;
- ``wakes``: what wakes the loop.
"""

from agent.daemon.loop import Daemon
from agent.daemon.wakes import Wake

__all__ = ["Daemon", "Wake"]

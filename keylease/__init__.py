"""What the node agent (``agent``) and the key broker (``kbs``) share, and nothing else.

- ``keylease.api.v1``: the wire contract (protos, generated modules, the functions both sides
  must compute identically) and ``keylease.api.v1.limits``, the size of every field;
  ``keylease.api.v1.nodeauth``: the node key and the MAC every node call after enrollment
  carries; ``keylease.api.v1.signing``: what the broker signs in a release, and which
  certificate may sign it.
- ``keylease.text``: ``printable``, the one escaping of strings from nodes and certificates.
- ``keylease.hardening``: no core dumps, no ptrace, memory locked (both daemons).
- ``keylease.secret``: bytes that never print.
- ``keylease.tomlfile``: the one TOML loader behind ``agent.toml`` and ``kbs.toml``.
- ``keylease.extras``: the message naming the pip extra a program is missing.

The base install holds only this package's dependencies (cryptography, grpcio, protobuf); each
program is an extra: ``pip install 'keylease[agent]'`` on a worker node, ``'keylease[broker]'`` on
the broker host.
"""

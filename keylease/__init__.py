"""What the node agent (``agent``) and the key broker (``kbs``) share, and nothing else.

- ``keylease.api.v1``: the wire contract (protos, generated modules, the functions both sides
  must compute identically) and ``keylease.api.v1.limits``, the size of every field.
- ``keylease.secret``: bytes that never print.
- ``keylease.tomlfile``: the one TOML loader behind ``agent.toml`` and ``kbs.toml``.
- ``keylease.extras``: the message naming the pip extra a program is missing.

The base install holds only this package's dependencies (cryptography, grpcio, protobuf); each
program is an extra: ``pip install 'keylease[agent]'`` on a worker node, ``'keylease[broker]'`` on
the broker host.
"""

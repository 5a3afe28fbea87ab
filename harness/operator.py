"""The operator's usual steps, through the real `keylease-kbs` command of a running broker."""

from __future__ import annotations

from pathlib import Path

from harness.broker import Broker
from harness.nodes import Node

__all__ = ["grant_node", "ok"]


def ok(result: object) -> None:
    assert getattr(result, "returncode", None) == 0, result


def grant_node(broker: Broker, node: Node, key_path: Path, key_name: str = "prod-key") -> None:
    """The operator's steps after a node's first (pending) attestation."""
    ok(broker.kbs("node", "approve", node.name, "--label", "cluster=prod", "--label", "region=eu"))
    ok(
        broker.kbs(
            "policy", "set", "prod-boot", "--pcrs", "0,1,2,3,4,5,6,7", "--from-node", node.name
        )
    )
    ok(broker.kbs("policy", "assign", "prod-boot", "--selector", "cluster=prod"))
    ok(broker.kbs("key", "import", key_name, "--private-key", str(key_path)))
    ok(broker.kbs("grant", "add", key_name, "--selector", "cluster=prod,region=eu"))

"""Validation of names that arrive from nodes and operators."""

from __future__ import annotations

import re

from kbs.errors import InvalidRequest

__all__ = ["check_node_name"]

_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_node_name(name: str) -> str:
    if not _NODE_NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid node name {name[:80]!r}: use 1-63 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return name

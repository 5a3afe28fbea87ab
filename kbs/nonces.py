"""Nonces (DESIGN.md step 2): the single-use challenge an attestation's quote must be made over.

Issued only to an enrolled node (the node check is part of the insert, no separate lookup); a
revoked node gets one too and is refused when it attests. Each lives ``nonce_ttl_seconds`` and
is consumed by the attestation that uses it (``kbs.attest``), whatever its outcome.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from kbs.context import BrokerContext
from kbs.model import check_node_name
from keylease.api.v1 import NONCE_BYTES

__all__ = ["issue_nonce"]


def issue_nonce(ctx: BrokerContext, node_name: str) -> tuple[bytes, datetime]:
    """A fresh nonce for an enrolled node (UnknownNode otherwise) and when it expires."""
    check_node_name(node_name)
    now = ctx.clock()
    nonce = os.urandom(NONCE_BYTES)
    expires_at = now + timedelta(seconds=ctx.config.nonce_ttl_seconds)
    ctx.store.add_nonce(node_name, nonce, expires_at)
    return nonce, expires_at

"""Node keys at rest: each node's call-authentication key, sealed under the master key.

The key is derived at enrollment from the credential-activation secret the node proved it holds
(``keylease.api.v1.nodeauth.node_key``) and stored in ``nodes.node_key`` as a master-key blob
(``kbs.masterkey``) bound to the node's name, so a row copied onto another node does not open.
"""

from __future__ import annotations

import logging

from kbs.errors import DatabaseUnavailable, StoreError
from kbs.masterkey import MasterKey
from kbs.store import Store
from keylease.api.v1.nodeauth import node_key
from keylease.secret import Secret

__all__ = ["node_key_aad", "open_node_key", "seal_new_node_key", "stored_node_key"]

log = logging.getLogger(__name__)


def node_key_aad(name: str) -> bytes:
    """AAD binding a sealed node key to its node's name."""
    return f"keylease node key {name}".encode()


def seal_new_node_key(master: MasterKey, name: str, activation_secret: bytes) -> bytes:
    """The node key for ``name`` from the secret it recovered with its TPM, sealed for storage."""
    return master.seal(node_key(activation_secret, name), node_key_aad(name))


def open_node_key(master: MasterKey, name: str, blob: bytes) -> Secret:
    """The node key from its stored blob; StoreError if it does not open."""
    return master.open(blob, node_key_aad(name))


def stored_node_key(store: Store, master: MasterKey, name: str) -> Secret | None:
    """The key of node ``name``, or None: an unknown node, one enrolled before node keys, or a
    blob that does not open (e.g. sealed under a master key no longer held; the node's calls are
    then refused until its agent enrolls again, which it does by itself). Raises StoreError when
    the database cannot be read."""
    blob = store.node_key(name)
    if blob is None:
        return None
    try:
        return open_node_key(master, name, blob)
    except DatabaseUnavailable:
        raise
    except StoreError as exc:
        log.warning("node=%s: its stored node key does not open: %s", name, exc)
        return None

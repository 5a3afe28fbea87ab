"""Operator actions behind ``keylease-kbs``: each validates its input, changes the database and
writes one audit record naming the operator. No printing and no argument parsing here.

Changes that concern nodes (revoke, approve, grants, a key's new or retired version, policies)
also record a row in the change feed, in the store's transaction, which the broker pushes to
watching agents. Policy changes are in ``kbs.admin.policies``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from kbs.admin.keyimport import load_private_key
from kbs.errors import NotFound, OperatorError
from kbs.masterkey import MasterKey, blob_key_id, key_aad
from kbs.model import (
    DeletedKey,
    Grant,
    Node,
    RetiredKey,
    StoredKey,
    check_name,
    format_selector,
)
from kbs.store import Store

__all__ = ["MAX_KEY_VERSION", "Admin", "check_ek_hash", "parse_pcr_list"]

_RESEAL_PASSES = 5
MAX_KEY_VERSION = 2**32 - 1  # the wire's uint32

_EK_HASH = re.compile(r"[0-9a-f]{64}")


def check_ek_hash(text: str) -> str:
    """An EK hash as the broker prints it: 64 hex digits (SHA-256), normalised to lower case."""
    value = text.strip().lower()
    if not _EK_HASH.fullmatch(value):
        raise OperatorError(
            f"invalid EK hash {text[:80]!r}: expected 64 hexadecimal digits (the SHA-256 the "
            "broker prints in refusals and `node list`)"
        )
    return value


def parse_pcr_list(text: str) -> list[int]:
    """``0,1,7`` -> [0, 1, 7]: PCR indices 0-23, each once, at least one."""
    indices: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 <= int(part) <= 23:
            raise OperatorError(
                f"invalid PCR list {text[:80]!r}: write PCR indices 0-23 separated by commas, "
                "e.g. 0,1,2,3,4,5,6,7"
            )
        if int(part) in indices:
            raise OperatorError(f"PCR {int(part)} is listed twice in {text[:80]!r}")
        indices.append(int(part))
    return sorted(indices)


@dataclass(frozen=True)
class Admin:
    """The operator's changes, each recorded in the audit log as ``actor``."""

    store: Store
    actor: str
    clock: Callable[[], datetime]

    def _audit(self, event: str, detail: str, node: str | None = None) -> None:
        self.store.audit(
            actor=self.actor, event=event, node=node, result="ok", detail=detail, now=self.clock()
        )

    def _node(self, name: str) -> Node:
        node = self.store.get_node(name)
        if node is None:
            raise NotFound(f"no node named {name!r}; `keylease-kbs node list` shows the nodes")
        return node

    def approve_node(self, name: str, labels: Mapping[str, str]) -> Node:
        before = self._node(name)
        node = self.store.approve_node(name, labels, self.clock())
        text = format_selector(labels) or "none"
        self._audit("approve", f"state {before.state.value} -> approved; labels {text}", name)
        return node

    def revoke_node(self, name: str) -> Node:
        before = self._node(name)
        node = self.store.revoke_node(name, self.clock())
        self._audit("revoke", f"state {before.state.value} -> revoked", name)
        return node

    def allow_ek(self, ek_hash: str) -> bool:
        digest = check_ek_hash(ek_hash)
        added = self.store.allow_ek(digest, self.clock())
        if added:
            self._audit("allowlist-add", f"ek {digest}")
        return added

    def import_key(self, name: str, data: bytes, source: str, master: MasterKey) -> StoredKey:
        """Parse, seal under the master key and store key ``name`` as version 1; an existing
        name is refused (that is ``rotate_key``)."""
        check_name(name, "key")
        pem, algorithm = load_private_key(data, source)
        key = self.store.add_sealed_key(
            name,
            algorithm,
            lambda version: master.seal(pem, key_aad(name, version)),
            self.clock(),
            must_exist=False,
        )
        self._audit("key-import", f"key {name} v{key.version} {algorithm}")
        return key

    def rotate_key(self, name: str, data: bytes, source: str, master: MasterKey) -> StoredKey:
        """Store a new private key as the next version of existing key ``name``: the current
        version from now on (the one to encrypt new images to), released beside the older
        versions not retired; the nodes it is granted to are told to attest again."""
        check_name(name, "key")
        pem, algorithm = load_private_key(data, source)
        current = self.store.get_key(name)
        if current is None:
            raise NotFound(
                f"no key named {name!r} to rotate; import it first with `keylease-kbs key import "
                f"{name} --private-key FILE`"
            )
        if master.open(current.encrypted_private, key_aad(name, current.version)) == pem:
            raise OperatorError(
                f"{source} is the key {name!r} already has (version {current.version}); rotate "
                "to a new key"
            )
        key = self.store.add_sealed_key(
            name,
            algorithm,
            lambda version: master.seal(pem, key_aad(name, version)),
            self.clock(),
            must_exist=True,
        )
        self._audit("key-rotate", f"key {name} v{current.version} -> v{key.version} {algorithm}")
        return key

    def retire_key(self, name: str, version: int) -> RetiredKey:
        """Stop releasing version ``version`` of key ``name``; the nodes it is granted to are
        told to attest again, and remove its file. The current version is refused."""
        check_name(name, "key")
        if not 1 <= version <= MAX_KEY_VERSION:
            raise OperatorError(f"invalid key version {version}: versions are numbered from 1")
        retired = self.store.retire_key(name, version, self.clock())
        self._audit(
            "key-retire",
            f"key {name} v{version} retired; {len(retired.nodes_notified)} node(s) told to "
            "attest again",
        )
        return retired

    def delete_key(self, name: str) -> DeletedKey:
        """Remove every version of key ``name`` and its grants; the nodes those grants covered
        are told to attest again (and drop the key)."""
        check_name(name, "key")
        deleted = self.store.delete_key(name, self.clock())
        self._audit(
            "key-delete",
            f"key {name}: {deleted.versions} version(s), {deleted.grants} grant(s) removed; "
            f"{len(deleted.nodes_notified)} node(s) told to attest again",
        )
        return deleted

    def reseal_keys(self, master: MasterKey) -> int:
        """Re-encrypt every stored key version not yet sealed under ``master``'s current key
        (opening it with any key ``master`` holds); returns how many were re-encrypted. Rows
        written meanwhile by another process are picked up by the next pass."""
        count = 0
        for _ in range(_RESEAL_PASSES):
            pending = [
                row
                for row in self.store.sealed_key_rows()
                if blob_key_id(row.encrypted_private) != master.current_id
            ]
            if not pending:
                break
            for row in pending:
                aad = key_aad(row.name, row.version)
                blob = master.seal(master.open(row.encrypted_private, aad), aad)
                count += self.store.replace_sealed_key(row, blob)
        else:
            raise OperatorError(
                "stored keys kept changing during the master-key rotation; run it again"
            )
        self._audit(
            "master-key-rotate",
            f"{count} key version(s) re-encrypted under master key {master.current_id}",
        )
        return count

    def add_grant(self, key_name: str, selector: Mapping[str, str]) -> Grant:
        check_name(key_name, "key")
        grant = self.store.add_grant(key_name, selector, self.clock())
        self._audit("grant-add", f"key {key_name} to {format_selector(selector)}")
        return grant

    def remove_grant(self, key_name: str, selector: Mapping[str, str]) -> None:
        check_name(key_name, "key")
        self.store.remove_grant(key_name, selector, self.clock())
        self._audit("grant-remove", f"key {key_name} from {format_selector(selector)}")

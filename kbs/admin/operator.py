"""The operator's actions as one interface, local or remote.

``Operator`` is what every ``keylease-kbs`` operator command calls. ``LocalOperator`` carries the
actions out on the database (``kbs.admin.actions.Admin`` for changes, the store for listings):
the command line uses it with the local database, and the admin API (``kbs.admin.service``) uses
it inside the broker for a remote operator. ``kbs.admin.client.RemoteOperator`` is the same
interface over the admin API. Both return the same domain values, so the command line prints
the same tables and JSON either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from kbs.admin.actions import Admin, parse_pcr_list
from kbs.admin.policies import PolicyAdmin, PolicyChange
from kbs.errors import NotFound, OperatorError
from kbs.masterkey import MasterKey
from kbs.model import (
    AuditEntry,
    BootRecord,
    DeletedKey,
    Grant,
    KeyDetails,
    Node,
    Policy,
    RetiredKey,
    StoredKey,
    check_name,
    parse_labels,
    parse_selector,
)
from kbs.policy.learn import DiffRow
from kbs.signing import SigningKeys

__all__ = ["LocalOperator", "Operator", "check_labels", "check_selector"]

MAX_AUDIT_LIMIT = 100_000


def check_selector(selector: Mapping[str, str]) -> dict[str, str]:
    """Validate a selector received as a map with the same rules as ``--selector``."""
    return parse_selector(",".join(f"{k}={v}" for k, v in selector.items()))


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    return parse_labels([f"{k}={v}" for k, v in labels.items()])


class Operator(Protocol):
    def list_nodes(self) -> list[Node]: ...
    def get_node(self, name: str) -> Node: ...
    def approve_node(self, name: str, labels: Mapping[str, str]) -> Node: ...
    def revoke_node(self, name: str) -> Node: ...
    def allow_ek(self, ek_hash: str) -> bool: ...
    def list_allowlist(self) -> list[tuple[str, datetime]]: ...
    def import_key(self, name: str, data: bytes, source: str) -> StoredKey: ...
    def rotate_key(self, name: str, data: bytes, source: str) -> StoredKey: ...
    def retire_key(self, name: str, version: int) -> RetiredKey: ...
    def delete_key(self, name: str) -> DeletedKey: ...
    def list_keys(self) -> list[StoredKey]: ...
    def show_key(self, name: str) -> KeyDetails: ...
    def add_grant(self, key: str, selector: Mapping[str, str]) -> Grant: ...
    def remove_grant(self, key: str, selector: Mapping[str, str]) -> None: ...
    def list_grants(self) -> list[Grant]: ...
    def set_policy(
        self, name: str, pcrs: Sequence[int], from_node: str | None, bank: str
    ) -> Policy: ...
    def assign_policy(self, name: str, selector: Mapping[str, str]) -> Policy: ...
    def unassign_policy(self, name: str, selector: Mapping[str, str]) -> None: ...
    def list_policies(self) -> list[Policy]: ...
    def node_boot(self, name: str) -> BootRecord | None: ...
    def learn_policy(
        self, name: str, from_node: str, bank: str, pcrs: Sequence[int]
    ) -> PolicyChange: ...
    def allow_policy(
        self, name: str, from_node: str, components: Sequence[str]
    ) -> PolicyChange: ...
    def get_policy(self, name: str) -> Policy: ...
    def diff_policy(self, name: str, node: str) -> list[DiffRow]: ...
    def apply_policy(self, data: bytes, source: str) -> PolicyChange: ...
    def list_audit(self, node: str | None, limit: int) -> list[AuditEntry]: ...


@dataclass(frozen=True)
class LocalOperator:
    """``Operator`` on a database. ``master`` gives the master key(s), read only when a key is
    imported or rotated; ``signing`` the release-signing keys, read only when a policy widens.
    Input is validated here too, since the admin API passes it through."""

    admin: Admin
    master: Callable[[], MasterKey]
    signing: Callable[[], SigningKeys]

    def list_nodes(self) -> list[Node]:
        return self.admin.store.list_nodes()

    def get_node(self, name: str) -> Node:
        node = self.admin.store.get_node(name)
        if node is None:
            raise NotFound(f"no node named {name!r}; `keylease-kbs node list` shows the nodes")
        return node

    def approve_node(self, name: str, labels: Mapping[str, str]) -> Node:
        return self.admin.approve_node(name, check_labels(labels))

    def revoke_node(self, name: str) -> Node:
        return self.admin.revoke_node(name)

    def allow_ek(self, ek_hash: str) -> bool:
        return self.admin.allow_ek(ek_hash)

    def list_allowlist(self) -> list[tuple[str, datetime]]:
        return self.admin.store.list_allowlist()

    def import_key(self, name: str, data: bytes, source: str) -> StoredKey:
        return self.admin.import_key(name, data, source, self.master())

    def rotate_key(self, name: str, data: bytes, source: str) -> StoredKey:
        return self.admin.rotate_key(name, data, source, self.master())

    def retire_key(self, name: str, version: int) -> RetiredKey:
        return self.admin.retire_key(name, version)

    def delete_key(self, name: str) -> DeletedKey:
        return self.admin.delete_key(name)

    def list_keys(self) -> list[StoredKey]:
        return self.admin.store.list_keys()

    def show_key(self, name: str) -> KeyDetails:
        return self.admin.store.key_details(check_name(name, "key"), self.admin.clock())

    def add_grant(self, key: str, selector: Mapping[str, str]) -> Grant:
        return self.admin.add_grant(key, check_selector(selector))

    def remove_grant(self, key: str, selector: Mapping[str, str]) -> None:
        self.admin.remove_grant(key, check_selector(selector))

    def list_grants(self) -> list[Grant]:
        return self.admin.store.list_grants()

    @property
    def _policies(self) -> PolicyAdmin:
        return PolicyAdmin(self.admin.store, self.admin.actor, self.admin.clock, self.signing)

    def set_policy(
        self, name: str, pcrs: Sequence[int], from_node: str | None, bank: str
    ) -> Policy:
        checked = parse_pcr_list(",".join(str(i) for i in pcrs)) if pcrs else []
        return self._policies.set_from_node(name, checked, from_node, bank)

    def assign_policy(self, name: str, selector: Mapping[str, str]) -> Policy:
        return self._policies.assign(name, check_selector(selector))

    def unassign_policy(self, name: str, selector: Mapping[str, str]) -> None:
        self._policies.unassign(name, check_selector(selector))

    def list_policies(self) -> list[Policy]:
        return self.admin.store.list_policies()

    def node_boot(self, name: str) -> BootRecord | None:
        self.get_node(name)
        return self.admin.store.boot_record(name)

    def learn_policy(
        self, name: str, from_node: str, bank: str, pcrs: Sequence[int]
    ) -> PolicyChange:
        checked = parse_pcr_list(",".join(str(i) for i in pcrs)) if pcrs else []
        return self._policies.learn(name, from_node, bank, checked)

    def allow_policy(self, name: str, from_node: str, components: Sequence[str]) -> PolicyChange:
        return self._policies.allow(name, from_node, components)

    def get_policy(self, name: str) -> Policy:
        return self.admin.store.get_policy(check_name(name, "policy"))

    def diff_policy(self, name: str, node: str) -> list[DiffRow]:
        return self._policies.diff(check_name(name, "policy"), node)

    def apply_policy(self, data: bytes, source: str) -> PolicyChange:
        return self._policies.apply(data, source)

    def list_audit(self, node: str | None, limit: int) -> list[AuditEntry]:
        if not 1 <= limit <= MAX_AUDIT_LIMIT:
            raise OperatorError(f"--limit must be from 1 to {MAX_AUDIT_LIMIT}")
        return self.admin.store.list_audit(node=node, limit=limit)

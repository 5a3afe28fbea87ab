"""The broker's domain values: nodes, enrollments, keys, grants, policies, audit entries, changes.

Everything here is a frozen dataclass or an enum, built from database rows by ``kbs.store`` and
from operator input by the parsers below (``parse_label``, ``parse_selector``, ``check_name``);
node names that arrive from nodes are checked by ``check_node_name``.
Labels and selectors follow the Kubernetes label syntax: ``[prefix/]name=value`` where name and
value are 1-63 characters from ``A-Z a-z 0-9 - _ .``, starting and ending alphanumeric.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from kbs.errors import InvalidRequest, OperatorError
from kbs.policy.rules import Document, Rule
from keylease.eventlog.bootstate import BootState, Component

__all__ = [
    "ApprovedState",
    "AuditEntry",
    "BootRecord",
    "Change",
    "ChangeKind",
    "DeletedKey",
    "Grant",
    "KeyDetails",
    "KeyHolder",
    "KeyState",
    "Node",
    "NodeState",
    "PendingEnrollment",
    "Policy",
    "RetiredKey",
    "StoredKey",
    "check_name",
    "check_node_name",
    "format_selector",
    "parse_label",
    "parse_labels",
    "parse_selector",
    "selector_matches",
    "selectors_overlap",
]


class NodeState(Enum):
    PENDING = "pending"
    APPROVED = "approved"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Node:
    name: str
    state: NodeState
    labels: Mapping[str, str]
    ek_hash: str
    ek_public: bytes
    ek_certificate: bytes
    ak_public: bytes
    metadata: Mapping[str, str]
    enrolled_at: datetime
    last_attested_at: datetime | None
    pcr_banks: Mapping[str, Mapping[int, bytes]]  # last verified quote: bank -> PCR -> value
    reset_count: int | None
    restart_count: int | None
    boot_log_digest: str | None = None  # SHA-256 of the last verified event log, if any
    last_denial: str | None = None  # the last denial's text, as the node was told
    last_denial_at: datetime | None = None
    # Of the node's last release (issue 11): its approvals' TPM-clock limit, the policy group
    # and the signing key (SHA-256 of its certificate, hex) its sealed object is bound to.
    approval_limit: int | None = None
    release_group: str | None = None
    release_signer: str | None = None


@dataclass(frozen=True)
class BootRecord:
    """The boot state of a node's last verified event log, in each bank it was checked in."""

    log_digest: str
    states: Mapping[str, BootState]
    recorded_at: datetime


@dataclass(frozen=True)
class ApprovedState:
    """A boot state the broker signs approvals for, for one node (``kbs.approvals``): the values
    of the PCRs its policies cover, in their bank, and the components it shows there."""

    bank: str
    pcrs: tuple[tuple[int, bytes], ...]  # (index, value), ascending
    components: tuple[Component, ...]
    origin: str  # "verified", "canary worker-2", "predicted from worker-1's log: ..."
    added_at: datetime

    @property
    def values(self) -> dict[int, bytes]:
        return dict(self.pcrs)


@dataclass(frozen=True)
class PendingEnrollment:
    """A credential-activation challenge waiting for the node's proof (single use)."""

    id: str
    node_name: str
    ek_public: bytes
    ek_certificate: bytes
    ak_public: bytes
    ek_hash: str
    secret_sha256: bytes
    metadata: Mapping[str, str]
    expires_at: datetime


@dataclass(frozen=True)
class Policy:
    """Allowed values per boot component (``kbs.policy.rules``); ``selectors`` are the label
    selectors it is assigned to."""

    name: str
    document: Document
    selectors: tuple[Mapping[str, str], ...]

    @property
    def pcr_bank(self) -> str:
        return self.document.bank

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.document.rules


class KeyState(Enum):
    """Where a key version is in its life: the newest version is the one images are encrypted
    to (CURRENT); older ones are still released so that older images pull (ACTIVE) until an
    operator retires them (RETIRED: never released again)."""

    CURRENT = "current"
    ACTIVE = "active"
    RETIRED = "retired"


@dataclass(frozen=True)
class StoredKey:
    """One version of an image key; ``encrypted_private`` is sealed under the master key
    (``kbs.masterkey``) and is empty in listings."""

    name: str
    version: int
    algorithm: str
    encrypted_private: bytes
    created_at: datetime
    state: KeyState = KeyState.CURRENT
    retired_at: datetime | None = None


@dataclass(frozen=True)
class RetiredKey:
    """What ``key retire`` did: the version retired, and the nodes told to attest again (and
    remove its file)."""

    key: StoredKey
    nodes_notified: tuple[str, ...]


@dataclass(frozen=True)
class KeyHolder:
    """The versions of one key a node's latest release gave it, while that lease lasts."""

    node: str
    versions: tuple[int, ...]
    released_at: datetime
    lease_until: datetime


@dataclass(frozen=True)
class KeyDetails:
    """``key show``: every version of one key, the selectors it is granted to, and the nodes
    holding it."""

    name: str
    versions: tuple[StoredKey, ...]
    grants: tuple[Mapping[str, str], ...]
    holders: tuple[KeyHolder, ...]


@dataclass(frozen=True)
class DeletedKey:
    """What ``key delete`` removed, and the nodes told to attest again (and drop the key)."""

    name: str
    versions: int
    grants: int
    nodes_notified: tuple[str, ...]


@dataclass(frozen=True)
class Grant:
    key_name: str
    selector: Mapping[str, str]
    created_at: datetime


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    event: str
    node: str | None
    result: str
    detail: str


class ChangeKind(Enum):
    """What the watch stream tells a node: its keys must go, or it should attest again."""

    REVOKED = "revoked"
    CHANGED = "changed"


@dataclass(frozen=True)
class Change:
    """One row of the change feed; ``node`` None means every node."""

    id: int
    at: datetime
    node: str | None
    kind: ChangeKind
    reason: str
    payload: bytes | None = None  # approvals for the node's watch stream (an ApprovalList)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
_LABEL_RULE = "1-63 characters from A-Z a-z 0-9 - _ . starting and ending with a letter or digit"


def check_name(name: str, kind: str) -> str:
    """Validate a key or policy name (the same rule as node names); raises OperatorError."""
    if not _NAME.fullmatch(name):
        raise OperatorError(
            f"invalid {kind} name {name[:80]!r}: use 1-63 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return name


def check_node_name(name: str) -> str:
    """Validate a node name that arrived from a node; raises InvalidRequest."""
    if not _NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid node name {name[:80]!r}: use 1-63 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return name


def _check_label_key(key: str, text: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if slash and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise OperatorError(
            f"invalid label key prefix {prefix[:80]!r} in {text[:120]!r}: the part before '/' "
            "must be a lower-case DNS subdomain such as example.com"
        )
    if not _LABEL_NAME.fullmatch(name):
        raise OperatorError(f"invalid label key {key[:80]!r} in {text[:120]!r}: use {_LABEL_RULE}")


def parse_label(text: str) -> tuple[str, str]:
    """Parse one ``key=value`` label; raises OperatorError saying what is wrong."""
    key, eq, value = text.partition("=")
    if not eq:
        raise OperatorError(f"invalid label {text[:120]!r}: write it as key=value, e.g. region=eu")
    key, value = key.strip(), value.strip()
    _check_label_key(key, text)
    if not _LABEL_NAME.fullmatch(value):
        raise OperatorError(
            f"invalid label value {value[:80]!r} in {text[:120]!r}: use {_LABEL_RULE}"
        )
    return key, value


def parse_labels(texts: Iterable[str]) -> dict[str, str]:
    """Parse repeated ``--label k=v`` options; a key given twice is refused."""
    labels: dict[str, str] = {}
    for text in texts:
        key, value = parse_label(text)
        if key in labels:
            raise OperatorError(f"label {key!r} is given twice; give each key once")
        labels[key] = value
    return labels


def parse_selector(text: str) -> dict[str, str]:
    """Parse ``k=v[,k=v...]``: a node matches when it carries every pair.

    An empty selector would match every labelled node, so it is refused.
    """
    parts = text.split(",")
    if not text.strip() or any(not p.strip() for p in parts):
        raise OperatorError(
            f"invalid selector {text[:120]!r}: write k=v pairs separated by commas, "
            "e.g. cluster=prod,region=eu (an empty selector would match every node)"
        )
    return parse_labels(parts)


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when every pair of a (non-empty) selector is among ``labels``."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selectors_overlap(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """True when one node's labels could match both selectors (no key with two values)."""
    return all(b.get(k, v) == v for k, v in a.items())


def format_selector(selector: Mapping[str, str]) -> str:
    """``k=v,k2=v2`` with keys sorted (the canonical text form of labels and selectors)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))

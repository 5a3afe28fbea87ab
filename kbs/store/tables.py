"""The broker database's tables (SQLAlchemy Core) and how values are stored in them.

Timestamps are UTC ISO-8601 text (fixed width, so they compare as text), PCR values JSON
``{"bank": {"index": "hex"}}``, labels and selectors canonical JSON, the key versions a node holds
JSON ``[["name", version], ...]``, policy documents and boot states JSON (``kbs.policy.rules``,
``keylease.eventlog.bootstate``), approved states JSON (``kbs.store.approvals``). Rows become the
frozen values of ``kbs.model`` here, never leaving the store as rows. The tables are created and
upgraded by the revisions in ``kbs/store/migrations``; these definitions must match them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from kbs.errors import StoreError
from kbs.model import KeyState, Node, NodeState, StoredKey

__all__ = [
    "admin_revocations",
    "allowlist",
    "approved_states",
    "audit_log",
    "boot_states",
    "changes",
    "dumps_banks",
    "dumps_held",
    "dumps_map",
    "enrollments",
    "grants",
    "key_from_row",
    "keys",
    "loads_banks",
    "loads_held",
    "loads_map",
    "node_from_row",
    "nodes",
    "nonces",
    "opt_dt",
    "policies",
    "policy_assignments",
    "ts",
]

Row = sa.RowMapping


def ts(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("the store takes timezone-aware datetimes only")
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def opt_dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def dumps_map(mapping: Mapping[str, str]) -> str:
    return json.dumps(dict(mapping), sort_keys=True, separators=(",", ":"))


def loads_map(text: str) -> dict[str, str]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreError("a JSON column holds something that is not an object")
    return {str(k): str(v) for k, v in value.items()}


def dumps_banks(banks: Mapping[str, Mapping[int, bytes]]) -> str:
    return json.dumps(
        {b: {str(i): v[i].hex() for i in sorted(v)} for b, v in sorted(banks.items())},
        separators=(",", ":"),
    )


def loads_banks(text: str) -> dict[str, dict[int, bytes]]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreError("a PCR column holds something that is not an object")
    return {
        str(b): {int(i): bytes.fromhex(v) for i, v in pcrs.items()} for b, pcrs in value.items()
    }


def dumps_held(held: Sequence[tuple[str, int]]) -> str:
    return json.dumps(sorted([n, v] for n, v in held), separators=(",", ":"))


def loads_held(text: str) -> list[tuple[str, int]]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int)
        for e in value
    ):
        raise StoreError("a node's held_keys column holds something that is not [[name, version]]")
    return [(str(n), int(v)) for n, v in value]


def node_from_row(row: Row) -> Node:
    return Node(
        name=row["name"],
        state=NodeState(row["state"]),
        labels=loads_map(row["labels"]),
        ek_hash=row["ek_hash"],
        ek_public=bytes(row["ek_public"]),
        ek_certificate=bytes(row["ek_certificate"]),
        ak_public=bytes(row["ak_public"]),
        metadata=loads_map(row["metadata"]),
        enrolled_at=datetime.fromisoformat(row["enrolled_at"]),
        last_attested_at=opt_dt(row["last_attested_at"]),
        pcr_banks=loads_banks(row["pcr_banks"]),
        reset_count=row["reset_count"],
        restart_count=row["restart_count"],
        boot_log_digest=row["boot_log_digest"],
        last_denial=row["last_denial"],
        last_denial_at=opt_dt(row["last_denial_at"]),
        approval_limit=row["approval_limit"],
        release_group=row["release_group"],
        release_signer=row["release_signer"],
    )


def key_from_row(row: Row, *, current: bool, with_secret: bool = True) -> StoredKey:
    """A ``keys`` row; ``current``: it is its key's newest version (the caller knows)."""
    retired_at = opt_dt(row["retired_at"])
    if current:
        state = KeyState.CURRENT
    else:
        state = KeyState.ACTIVE if retired_at is None else KeyState.RETIRED
    return StoredKey(
        name=row["name"],
        version=row["version"],
        algorithm=row["algorithm"],
        encrypted_private=bytes(row["encrypted_private"]) if with_secret else b"",
        created_at=datetime.fromisoformat(row["created_at"]),
        state=state,
        retired_at=retired_at,
    )


META = sa.MetaData()
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER: SQLite's rowid alias


def _table(name: str, *cols: sa.Column[Any]) -> sa.Table:
    return sa.Table(name, META, *cols, sqlite_autoincrement=name in ("audit", "changes"))


def _c(name: str, kind: Any, **kw: Any) -> sa.Column[Any]:
    return sa.Column(name, kind, nullable=kw.pop("nullable", False), **kw)


T, B, I = sa.Text(), sa.LargeBinary(), sa.Integer()  # noqa: E741
nodes = _table(
    "nodes", _c("name", T, primary_key=True), _c("state", T), _c("labels", T),
    _c("ek_hash", T, unique=True), _c("ek_public", B), _c("ek_certificate", B),
    _c("ak_public", B), _c("metadata", T), _c("enrolled_at", T), _c("updated_at", T),
    _c("last_attested_at", T, nullable=True), _c("reset_count", I, nullable=True),
    _c("restart_count", I, nullable=True), _c("pcr_banks", T),
    _c("boot_log_digest", T, nullable=True), _c("last_denial", T, nullable=True),
    _c("last_denial_at", T, nullable=True),
    _c("held_keys", T, server_default="[]"), _c("lease_until", T, nullable=True),
    _c("node_key", B, nullable=True), _c("approval_limit", sa.BigInteger(), nullable=True),
    _c("release_group", T, nullable=True), _c("release_signer", T, nullable=True),
)  # fmt: skip
approved_states = _table("approved_states", _c("node_name", T, primary_key=True),
                         _c("states", T), _c("updated_at", T))  # fmt: skip
boot_states = _table("boot_states", _c("node_name", T, primary_key=True),
                     _c("log_digest", T), _c("states", T), _c("recorded_at", T))  # fmt: skip
nonces = _table("nonces", _c("nonce", B, primary_key=True), _c("node_name", T),
                _c("expires_at", T))  # fmt: skip
enrollments = _table(
    "enrollments", _c("id", T, primary_key=True), _c("node_name", T), _c("ek_public", B),
    _c("ek_certificate", B), _c("ak_public", B), _c("ek_hash", T), _c("secret_sha256", B),
    _c("metadata", T), _c("expires_at", T),
)  # fmt: skip
allowlist = _table("allowlist", _c("ek_hash", T, primary_key=True), _c("added_at", T))
keys = _table(
    "keys", _c("name", T, primary_key=True), _c("version", I, primary_key=True),
    _c("algorithm", T), _c("encrypted_private", B), _c("created_at", T),
    _c("retired_at", T, nullable=True),
)  # fmt: skip
grants = _table("grants", _c("key_name", T, primary_key=True),
                _c("selector", T, primary_key=True), _c("created_at", T))  # fmt: skip
policies = _table("policies", _c("name", T, primary_key=True), _c("pcr_bank", T),
                  _c("document", T), _c("updated_at", T))  # fmt: skip
policy_assignments = _table(
    "policy_assignments", _c("policy_name", T, primary_key=True),
    _c("selector", T, primary_key=True), _c("created_at", T),
)  # fmt: skip
audit_log = _table(
    "audit", _c("id", BIGID, primary_key=True, autoincrement=True), _c("at", T), _c("actor", T),
    _c("event", T), _c("node", T, nullable=True), _c("result", T), _c("detail", T),
)  # fmt: skip
changes = _table(
    "changes", _c("id", BIGID, primary_key=True, autoincrement=True), _c("at", T),
    _c("node", T, nullable=True), _c("kind", T), _c("reason", T),
    _c("payload", B, nullable=True),
)  # fmt: skip
admin_revocations = _table("admin_revocations", _c("serial", T, primary_key=True),
                          _c("name", T), _c("revoked_at", T))  # fmt: skip

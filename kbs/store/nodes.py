"""Enrolled nodes: their EK binding, state, labels and last verified attestation.

``enroll_node`` is one transaction under the ``nodes`` unique constraints (name, EK hash),
retried on a race with another writer, so one name or EK never yields two nodes; it stores the
node key (sealed) the node's calls are authenticated with, and an enrollment of a known node
records a CHANGED row so that every replica forgets the old key it may have cached
(``kbs.nodeapi.nodeauth``). A state change
by the operator records its change-feed row (``kbs.store.changes``) in the same transaction;
revoking also drops the node's outstanding nonces and challenges. ``record_attestation`` writes
the verified PCR values, the key versions the outcome leaves the node holding (``key show``), the
boot state of a new event log (only when the log changed: a renewal with the same log writes none
of it), the denial if there was one, and the audit rows of the outcome together.
``boot_record`` reads the boot state back (``policy learn``, ``node show``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from kbs.errors import NodeEkConflict, NotFound, StoreConflict, StoreError
from kbs.model import ApprovedState, BootRecord, ChangeKind, Node, NodeState
from kbs.store.approvals import write_states
from kbs.store.audit import AuditEvent, write_audit
from kbs.store.changes import purge_changes, record_change
from kbs.store.database import Database
from kbs.store.tables import (
    boot_states,
    dumps_banks,
    dumps_held,
    dumps_map,
    enrollments,
    node_from_row,
    nodes,
    nonces,
    ts,
)
from keylease.eventlog.bootstate import BootState

__all__ = [
    "ENROLL_ATTEMPTS",
    "BootUpdate",
    "ReleaseBinding",
    "boot_record",
    "boot_records",
    "count_nodes_by_state",
    "enroll_node",
    "get_node",
    "list_nodes",
    "node_by_ek",
    "node_key",
    "record_attestation",
    "set_state",
]

ENROLL_ATTEMPTS = 3

P = sa.bindparam
# The attestation path's statements, compiled once per dialect (``Database.run``).
GET_NODE = sa.select(nodes).where(nodes.c.name == P("p_name"))
GET_NODE_KEY = sa.select(nodes.c.node_key).where(nodes.c.name == P("p_name"))
RECORD_ATTESTATION = (
    nodes.update()
    .where(nodes.c.name == P("p_name"))
    .values(last_attested_at=P("p_at"), pcr_banks=P("p_banks"), reset_count=P("p_reset"),
            restart_count=P("p_restart"))
)  # fmt: skip
RECORD_ATTESTATION_HELD = RECORD_ATTESTATION.values(held_keys=P("p_held"), lease_until=P("p_until"))
RECORD_RELEASE = RECORD_ATTESTATION_HELD.values(
    approval_limit=P("p_limit"), release_group=P("p_group"), release_signer=P("p_signer")
)
RECORD_LOG = nodes.update().where(nodes.c.name == P("p_name")).values(boot_log_digest=P("p_log"))
RECORD_DENIAL = (
    nodes.update()
    .where(nodes.c.name == P("p_name"))
    .values(last_denial=P("p_denial"), last_denial_at=P("p_at"))
)
DROP_BOOT_STATE = boot_states.delete().where(boot_states.c.node_name == P("p_name"))
MAX_DENIAL = 4000


@dataclass(frozen=True)
class ReleaseBinding:
    """What a release bound the node's sealed cache to (``kbs.approvals``): its approvals'
    TPM-clock limit, the policy group and the signing key (SHA-256 of its certificate, hex)."""

    approval_limit: int
    group: str
    signer: str


@dataclass(frozen=True)
class BootUpdate:
    """A node's new verified event log (``digest`` None: it sent none this time)."""

    digest: str | None
    states: Mapping[str, BootState]


def get_node(db: Database, name: str) -> Node | None:
    with db.tx(write=False, single=True) as conn:
        row = db.run(conn, GET_NODE, {"p_name": name}).mappings().first()
    return None if row is None else node_from_row(row)


def node_key(db: Database, name: str) -> bytes | None:
    """The node's sealed node key; None for an unknown node or one enrolled before node keys."""
    with db.tx(write=False, single=True) as conn:
        row = db.run(conn, GET_NODE_KEY, {"p_name": name}).first()
    return None if row is None or row[0] is None else bytes(row[0])


def _node_or_raise(conn: sa.Connection, name: str) -> Node:
    row = conn.execute(sa.select(nodes).where(nodes.c.name == name)).mappings().first()
    if row is None:
        raise NotFound(f"no node named {name!r}; `keylease-kbs node list` shows the nodes")
    return node_from_row(row)


def list_nodes(db: Database) -> list[Node]:
    with db.tx(write=False, single=True) as conn:
        rows = conn.execute(sa.select(nodes).order_by(nodes.c.name)).mappings().all()
    return [node_from_row(r) for r in rows]


def count_nodes_by_state(db: Database) -> dict[NodeState, int]:
    """How many nodes are in each state (one ``GROUP BY``; states with none are absent)."""
    query = sa.select(nodes.c.state, sa.func.count()).group_by(nodes.c.state)
    with db.tx(write=False, single=True) as conn:
        return {NodeState(state): int(n) for state, n in conn.execute(query).all()}


def node_by_ek(db: Database, ek_hash: str) -> Node | None:
    with db.tx(write=False, single=True) as conn:
        row = conn.execute(sa.select(nodes).where(nodes.c.ek_hash == ek_hash)).mappings().first()
    return None if row is None else node_from_row(row)


def enroll_node(
    db: Database,
    *,
    name: str,
    ek_hash: str,
    ek_public: bytes,
    ek_certificate: bytes,
    ak_public: bytes,
    state: NodeState,
    metadata: Mapping[str, str],
    now: datetime,
    node_key: bytes | None = None,
) -> Node:
    """Record a new node, or re-key the AK and node key of a known node with the same EK (state
    and labels kept; the recorded reset/restart counters start over, as a new AK's quotes may
    come from a cleared TPM). A name bound to another EK, or this EK under another name:
    NodeEkConflict. A race with another writer (another replica) is retried, so its loser sees
    the winner's row. Without ``node_key`` every call of the node is refused until it enrolls
    again."""
    rekey = dict(ek_certificate=ek_certificate, ak_public=ak_public, node_key=node_key,
                 metadata=dumps_map(metadata), updated_at=ts(now))  # fmt: skip
    new = dict(name=name, state=state.value, labels="{}", ek_hash=ek_hash, ek_public=ek_public,
               enrolled_at=ts(now), pcr_banks="{}", **rekey)  # fmt: skip
    for attempt in range(ENROLL_ATTEMPTS):
        try:
            with db.tx(catalog=False) as conn:
                if _known(conn, name, ek_hash):
                    conn.execute(
                        nodes.update()
                        .where(nodes.c.name == name)
                        .values({**rekey, "reset_count": None, "restart_count": None})
                    )
                    record_change(db, conn, name, ChangeKind.CHANGED, "enrolled again", now)
                else:
                    conn.execute(nodes.insert().values(new))
                return _node_or_raise(conn, name)
        except StoreConflict:
            if attempt == ENROLL_ATTEMPTS - 1:
                break
    raise NodeEkConflict(f"node {name!r} or EK {ek_hash} keeps being enrolled concurrently")


def _known(conn: sa.Connection, name: str, ek_hash: str) -> bool:
    """True if node ``name`` is enrolled with this EK, False if neither is enrolled;
    NodeEkConflict if the name is bound to another EK or the EK to another name."""
    found = conn.execute(
        sa.select(nodes.c.name, nodes.c.ek_hash).where(
            sa.or_(nodes.c.name == name, nodes.c.ek_hash == ek_hash)
        )
    ).all()
    by_name = next((ek for n, ek in found if n == name), None)
    by_ek = next((n for n, ek in found if ek == ek_hash), None)
    if by_name is not None and by_name != ek_hash:
        raise NodeEkConflict(
            f"node {name!r} is enrolled with another EK (sha256 {by_name}); "
            f"this EK is {ek_hash}. If the node's TPM was replaced, revoke the old node "
            "and enroll the new one under a new name"
        )
    if by_ek is not None and by_ek != name:
        raise NodeEkConflict(
            f"this EK ({ek_hash}) is already enrolled as node {by_ek!r}; a TPM "
            f'enrolls under one name: set node_name = "{by_ek}" in the agent config'
        )
    return by_name is not None


def set_state(
    db: Database, name: str, state: NodeState, labels: Mapping[str, str] | None, now: datetime
) -> Node:
    """The operator's approval (with new labels) or revocation of a node, with its change-feed
    row; revoking drops the node's outstanding nonces and challenges. NotFound if unknown."""
    values: dict[str, str] = {"state": state.value, "updated_at": ts(now)}
    if labels is not None:
        values["labels"] = dumps_map(labels)
    with db.tx() as conn:
        if conn.execute(nodes.update().where(nodes.c.name == name).values(values)).rowcount != 1:
            raise NotFound(f"no node named {name!r}; `keylease-kbs node list` shows the nodes")
        if state is NodeState.REVOKED:  # its agent is told to remove its keys
            conn.execute(nodes.update().where(nodes.c.name == name).values(held_keys="[]"))
            conn.execute(nonces.delete().where(nonces.c.node_name == name))
            conn.execute(enrollments.delete().where(enrollments.c.node_name == name))
            record_change(db, conn, name, ChangeKind.REVOKED, "revoked by the operator", now)
        else:
            record_change(
                db, conn, name, ChangeKind.CHANGED, "state or labels changed by the operator", now
            )
        purge_changes(conn, now)
        return _node_or_raise(conn, name)


def record_attestation(
    db: Database,
    name: str,
    *,
    banks: Mapping[str, Mapping[int, bytes]],
    reset_count: int | None,
    restart_count: int | None,
    now: datetime,
    events: Sequence[AuditEvent] = (),
    held: Sequence[tuple[str, int]] | None = (),
    lease_until: datetime | None = None,
    boot: BootUpdate | None = None,
    denial: str | None = None,
    binding: ReleaseBinding | None = None,
    states: Sequence[ApprovedState] | None = None,
) -> None:
    """Store the PCR values and counters of a verified quote, the key versions (name, version)
    the node holds after it until ``lease_until`` (a release; ``()``: none, as after a denial;
    None: unchanged, as after a failure of the broker's own), the boot state of a changed event
    log (``boot``; None when it is the one already recorded), the denial text if the node was
    denied, the binding of a release and the node's approved states when they changed
    (``binding``, ``states``), and the audit rows of its outcome (``events``), in one
    transaction."""
    params = {
        "p_name": name,
        "p_at": ts(now),
        "p_banks": dumps_banks(banks),
        "p_reset": reset_count,
        "p_restart": restart_count,
    }
    statement = RECORD_ATTESTATION
    if held is not None:
        statement = RECORD_ATTESTATION_HELD
        params |= {"p_held": dumps_held(held),
                   "p_until": ts(lease_until) if held and lease_until else None}  # fmt: skip
        if binding is not None:
            statement = RECORD_RELEASE
            params |= {"p_limit": binding.approval_limit, "p_group": binding.group,
                       "p_signer": binding.signer}  # fmt: skip
    alone = not events and boot is None and denial is None and states is None
    with db.tx(single=alone, catalog=False) as conn:
        if db.run(conn, statement, params).rowcount != 1:
            raise NotFound(f"no node named {name!r}")
        if boot is not None:
            _record_boot(db, conn, name, boot, now)
        if denial is not None:
            db.run(
                conn,
                RECORD_DENIAL,
                {"p_name": name, "p_denial": denial[:MAX_DENIAL], "p_at": ts(now)},
            )
        if states is not None:
            write_states(db, conn, name, states, now)
        write_audit(db, conn, events, now)


def _record_boot(
    db: Database, conn: sa.Connection, name: str, boot: BootUpdate, now: datetime
) -> None:
    db.run(conn, RECORD_LOG, {"p_name": name, "p_log": boot.digest})
    if boot.digest is None:
        db.run(conn, DROP_BOOT_STATE, {"p_name": name})
        return
    states = json.dumps(
        {b: s.to_doc() for b, s in sorted(boot.states.items())}, separators=(",", ":")
    )
    values = {
        "node_name": name,
        "log_digest": boot.digest,
        "states": states,
        "recorded_at": ts(now),
    }
    stmt = db.upsert(boot_states).values(values)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[boot_states.c.node_name],
            set_={c: stmt.excluded[c] for c in ("log_digest", "states", "recorded_at")},
        )
    )


def _states(name: str, text: str) -> dict[str, BootState]:
    try:
        raw = json.loads(text)
        return {str(b): BootState.from_doc(doc) for b, doc in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"the stored boot state of node {name!r} is unreadable: {exc}") from None


def boot_record(db: Database, name: str) -> BootRecord | None:
    """The boot state of the node's last verified event log, None if it sent none."""
    query = sa.select(boot_states).where(boot_states.c.node_name == name)
    with db.tx(write=False, single=True) as conn:
        row = conn.execute(query).mappings().first()
    if row is None:
        return None
    states = _states(name, row["states"])
    return BootRecord(row["log_digest"], states, datetime.fromisoformat(row["recorded_at"]))


def boot_records(db: Database) -> dict[str, BootRecord]:
    """Every node's boot record (one statement; the states of one log are read once, however
    many nodes sent it)."""
    with db.tx(write=False, single=True) as conn:
        rows = conn.execute(sa.select(boot_states)).mappings().all()
    read: dict[str, dict[str, BootState]] = {}
    out = {}
    for row in rows:
        digest = row["log_digest"]
        if digest not in read:
            read[digest] = _states(row["node_name"], row["states"])
        out[row["node_name"]] = BootRecord(
            digest, read[digest], datetime.fromisoformat(row["recorded_at"])
        )
    return out

"""Approved boot states per node (``approved_states``): the states the broker signs approvals for.

One row per node holds its states as JSON: ``[{"bank", "pcrs": {"index": "hex"}, "components":
[[name, [pcrs], value, summary, [entries]]], "origin", "added_at"}]``. The attestation path
rewrites it (in its one transaction, ``kbs.store.nodes.record_attestation``) only when the set
changed; a widened policy adds states to every node it concerns in the policy change's own
transaction (``add_states``), each carrying the pushed approvals in its change row. At most
``MAX_STATES`` per node: the oldest go first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from kbs.errors import StoreError
from kbs.model import ApprovedState
from kbs.store.database import Database
from kbs.store.tables import approved_states, ts
from keylease.eventlog.bootstate import Component

__all__ = [
    "MAX_STATES",
    "StatePush",
    "add_states",
    "bounded",
    "node_states",
    "read_states",
    "states_from_json",
    "states_json",
    "write_states",
]

MAX_STATES = 16

P = sa.bindparam
GET_STATES = sa.select(approved_states.c.states).where(approved_states.c.node_name == P("p_name"))


@dataclass(frozen=True)
class StatePush:
    """What a widened policy gives one node: new approved states, and the approvals (an
    ``ApprovalList``, wire bytes) its watch stream carries."""

    states: tuple[ApprovedState, ...]
    payload: bytes


def _state_doc(s: ApprovedState) -> dict[str, object]:
    return {
        "bank": s.bank,
        "pcrs": {str(i): v.hex() for i, v in s.pcrs},
        "components": [
            [c.name, list(c.pcrs), c.value, c.summary, list(c.entries)] for c in s.components
        ],
        "origin": s.origin,
        "added_at": ts(s.added_at),
    }


def states_json(states: Sequence[ApprovedState]) -> str:
    return json.dumps([_state_doc(s) for s in states], separators=(",", ":"))


def _component(doc: list[object]) -> Component:
    name, pcrs, value, summary, entries = doc
    if not isinstance(pcrs, list) or not isinstance(entries, list):
        raise TypeError("a stored component needs lists")
    return Component(
        str(name), tuple(int(p) for p in pcrs), str(value), str(summary), tuple(map(str, entries))
    )


def states_from_json(text: str) -> list[ApprovedState]:
    try:
        return [
            ApprovedState(
                bank=str(d["bank"]),
                pcrs=tuple(sorted((int(i), bytes.fromhex(v)) for i, v in d["pcrs"].items())),
                components=tuple(_component(c) for c in d["components"]),
                origin=str(d["origin"]),
                added_at=datetime.fromisoformat(d["added_at"]),
            )
            for d in json.loads(text)
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"stored approved states are unreadable: {exc}") from None


def bounded(states: Sequence[ApprovedState]) -> list[ApprovedState]:
    """One state per (bank, PCR values), the newest ``MAX_STATES``, oldest first."""
    unique: dict[tuple[str, tuple[tuple[int, bytes], ...]], ApprovedState] = {}
    for s in states:
        unique.pop((s.bank, s.pcrs), None)
        unique[(s.bank, s.pcrs)] = s  # the later one wins (and moves to the end)
    kept = sorted(unique.values(), key=lambda s: s.added_at)
    return kept[-MAX_STATES:]


def read_states(db: Database, conn: sa.Connection, name: str) -> list[ApprovedState]:
    row = db.run(conn, GET_STATES, {"p_name": name}).first()
    return [] if row is None else states_from_json(row[0])


def write_states(
    db: Database, conn: sa.Connection, name: str, states: Sequence[ApprovedState], now: datetime
) -> None:
    stmt = db.upsert(approved_states).values(
        node_name=name, states=states_json(states), updated_at=ts(now)
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[approved_states.c.node_name],
            set_={c: stmt.excluded[c] for c in ("states", "updated_at")},
        )
    )


def add_states(
    db: Database, conn: sa.Connection, name: str, new: Sequence[ApprovedState], now: datetime
) -> None:
    """Add ``new`` to the node's states (in the open transaction ``conn``)."""
    write_states(db, conn, name, bounded([*read_states(db, conn, name), *new]), now)


def node_states(db: Database, name: str) -> list[ApprovedState]:
    with db.tx(write=False, single=True) as conn:
        return read_states(db, conn, name)

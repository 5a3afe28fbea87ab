"""The change feed: what connected agents are told on the Watch stream.

Operator actions record their rows here *in the same transaction* as the change itself
(``record_change`` and ``notify_matching`` take the open connection), so a change is never
visible without its notification (or the reverse). A reader remembers the last id it saw, so
ids must become visible in order: SQLite serialises writers (``BEGIN IMMEDIATE``); on
PostgreSQL a transaction takes an advisory lock before it draws an id and holds it to commit, so
an id is never committed after a larger one. Rows older than ``CHANGE_RETENTION`` are purged
whenever a change is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

import sqlalchemy as sa

from kbs.model import Change, ChangeKind, NodeState, selector_matches
from kbs.store.database import Database
from kbs.store.tables import changes, loads_map, nodes, ts

__all__ = [
    "CHANGES_LOCK",
    "CHANGE_RETENTION",
    "MAX_CHANGES_PER_READ",
    "add_change",
    "changes_since",
    "last_change_id",
    "notify_matching",
    "purge_changes",
    "record_change",
]

CHANGE_RETENTION = timedelta(days=1)
MAX_CHANGES_PER_READ = 1000
CHANGES_LOCK = 0x6B6C6368  # pg advisory lock id: "klch"


def add_change(db: Database, node: str | None, kind: ChangeKind, reason: str, now: datetime) -> int:
    """Record one change (``node`` None: every node); returns its id."""
    with db.tx() as conn:
        change_id = record_change(db, conn, node, kind, reason, now)
        purge_changes(conn, now)
        return change_id


def changes_since(db: Database, last_id: int, limit: int = MAX_CHANGES_PER_READ) -> list[Change]:
    """Changes with an id above ``last_id``, oldest first, at most ``limit``."""
    query = (
        sa.select(changes).where(changes.c.id > last_id).order_by(changes.c.id)
        .limit(max(limit, 0))
    )  # fmt: skip
    with db.tx(write=False, single=True) as conn:
        rows = conn.execute(query).mappings().all()
    return [
        Change(
            id=int(r["id"]),
            at=datetime.fromisoformat(r["at"]),
            node=r["node"],
            kind=ChangeKind(r["kind"]),
            reason=r["reason"],
            payload=None if r["payload"] is None else bytes(r["payload"]),
        )
        for r in rows
    ]


def last_change_id(db: Database) -> int:
    """The id of the newest change recorded (0 if none); on SQLite purged rows included. Every
    later change has a larger id."""
    query: sa.Executable
    if db.is_sqlite:
        query = sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'changes'")
    else:
        query = sa.select(sa.func.max(changes.c.id))
    with db.tx(write=False, single=True) as conn:
        value = conn.execute(query).scalar()
    return 0 if value is None else int(value)


# --- inside other operations' transactions ----------------------------------------------------


def record_change(
    db: Database,
    conn: sa.Connection,
    node: str | None,
    kind: ChangeKind,
    reason: str,
    now: datetime,
    payload: bytes | None = None,
) -> int:
    """Record one change in the open transaction ``conn``; returns its id."""
    if not db.is_sqlite:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(CHANGES_LOCK)))
    row = conn.execute(
        changes.insert()
        .values(at=ts(now), node=node, kind=kind.value, reason=reason, payload=payload)
        .returning(changes.c.id)
    ).scalar_one()
    return int(row)


def purge_changes(conn: sa.Connection, now: datetime) -> None:
    """Drop the rows older than ``CHANGE_RETENTION``."""
    conn.execute(changes.delete().where(changes.c.at < ts(now - CHANGE_RETENTION)))


def notify_matching(
    db: Database,
    conn: sa.Connection,
    selectors: Iterable[Mapping[str, str]],
    reason: str,
    now: datetime,
    payloads: Mapping[str, bytes] | None = None,
) -> list[str]:
    """Record CHANGED for every node that is not revoked and whose labels match any of
    ``selectors`` (with ``payloads[node]``, the approvals its watch stream carries, if any);
    returns their names."""
    wanted = list(selectors)
    rows = conn.execute(
        sa.select(nodes.c.name, nodes.c.labels)
        .where(nodes.c.state != NodeState.REVOKED.value)
        .order_by(nodes.c.name)
    ).all()
    names = [
        name for name, labels in rows
        if any(selector_matches(s, loads_map(labels)) for s in wanted)
    ]  # fmt: skip
    for name in names:
        payload = (payloads or {}).get(name)
        record_change(db, conn, name, ChangeKind.CHANGED, reason, now, payload)
    if names:
        purge_changes(conn, now)
    return names

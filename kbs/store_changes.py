"""The broker database's change feed: what connected agents are told on the Watch stream.

Part of ``kbs.store.Store`` (see ``kbs.store_db`` for storage conventions). Operator actions
record their rows here *in the same transaction* as the change itself, so a change is never
visible without its notification (or the reverse). A reader remembers the last id it saw, so ids
must become visible in order: SQLite serialises writers (``BEGIN IMMEDIATE``); on PostgreSQL a
transaction takes an advisory lock before it draws an id and holds it to commit, so an id is
never committed after a larger one. Rows older than ``CHANGE_RETENTION`` are purged whenever a
change is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

import sqlalchemy as sa

from kbs.model import Change, ChangeKind, NodeState, selector_matches
from kbs.store_db import Database, changes, loads_map, nodes, ts

__all__ = ["CHANGES_LOCK", "CHANGE_RETENTION", "MAX_CHANGES_PER_READ", "Changes"]

CHANGE_RETENTION = timedelta(days=1)
MAX_CHANGES_PER_READ = 1000
CHANGES_LOCK = 0x6B6C6368  # pg advisory lock id: "klch"


class Changes(Database):
    """The ``changes`` table; part of ``kbs.store.Store``."""

    def add_change(self, node: str | None, kind: ChangeKind, reason: str, now: datetime) -> int:
        """Record one change (``node`` None: every node); returns its id."""
        with self._tx() as db:
            change_id = self._record_change(db, node, kind, reason, now)
            self._purge_changes(db, now)
            return change_id

    def changes_since(self, last_id: int, limit: int = MAX_CHANGES_PER_READ) -> list[Change]:
        """Changes with an id above ``last_id``, oldest first, at most ``limit``."""
        query = (
            sa.select(changes).where(changes.c.id > last_id).order_by(changes.c.id)
            .limit(max(limit, 0))
        )  # fmt: skip
        with self._tx(write=False, single=True) as db:
            rows = db.execute(query).mappings().all()
        return [
            Change(
                id=int(r["id"]),
                at=datetime.fromisoformat(r["at"]),
                node=r["node"],
                kind=ChangeKind(r["kind"]),
                reason=r["reason"],
            )
            for r in rows
        ]

    def last_change_id(self) -> int:
        """The id of the newest change recorded (0 if none); on SQLite purged rows included.
        Every later change has a larger id."""
        query: sa.Executable
        if self.is_sqlite:
            query = sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'changes'")
        else:
            query = sa.select(sa.func.max(changes.c.id))
        with self._tx(write=False, single=True) as db:
            value = db.execute(query).scalar()
        return 0 if value is None else int(value)

    # --- used inside other methods' transactions ------------------------------------------------

    def _record_change(
        self, db: sa.Connection, node: str | None, kind: ChangeKind, reason: str, now: datetime
    ) -> int:
        if not self.is_sqlite:
            db.execute(sa.select(sa.func.pg_advisory_xact_lock(CHANGES_LOCK)))
        row = db.execute(
            changes.insert()
            .values(at=ts(now), node=node, kind=kind.value, reason=reason)
            .returning(changes.c.id)
        ).scalar_one()
        return int(row)

    def _purge_changes(self, db: sa.Connection, now: datetime) -> None:
        db.execute(changes.delete().where(changes.c.at < ts(now - CHANGE_RETENTION)))

    def _notify_matching(
        self,
        db: sa.Connection,
        selectors: Iterable[Mapping[str, str]],
        reason: str,
        now: datetime,
    ) -> list[str]:
        """Record CHANGED for every node that is not revoked and whose labels match any of
        ``selectors``; returns their names."""
        wanted = list(selectors)
        rows = db.execute(
            sa.select(nodes.c.name, nodes.c.labels)
            .where(nodes.c.state != NodeState.REVOKED.value)
            .order_by(nodes.c.name)
        ).all()
        names = [
            name for name, labels in rows
            if any(selector_matches(s, loads_map(labels)) for s in wanted)
        ]  # fmt: skip
        for name in names:
            self._record_change(db, name, ChangeKind.CHANGED, reason, now)
        if names:
            self._purge_changes(db, now)
        return names

"""The broker database's change feed: what connected agents are told on the Watch stream.

Part of ``kbs.store.Store`` (see ``kbs.store_db`` for storage conventions). Operator actions
record their rows here *in the same transaction* as the change itself, so a change is never
visible without its notification (or the reverse). Ids only grow (``AUTOINCREMENT``) and writers
are serialised (``BEGIN IMMEDIATE``), so a reader that remembers the last id it saw misses
nothing. Rows older than ``CHANGE_RETENTION`` are purged whenever a change is recorded.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from kbs.model import Change, ChangeKind, NodeState, selector_matches
from kbs.store_db import Database, loads_map, ts

__all__ = ["CHANGE_RETENTION", "MAX_CHANGES_PER_READ", "Changes"]

CHANGE_RETENTION = timedelta(days=1)
MAX_CHANGES_PER_READ = 1000


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
        with self._tx(write=False) as db:
            rows = db.execute(
                "SELECT * FROM changes WHERE id > ? ORDER BY id LIMIT ?", (last_id, max(limit, 0))
            ).fetchall()
        return [
            Change(
                id=r["id"],
                at=datetime.fromisoformat(r["at"]),
                node=r["node"],
                kind=ChangeKind(r["kind"]),
                reason=r["reason"],
            )
            for r in rows
        ]

    def last_change_id(self) -> int:
        """The id of the newest change ever recorded (0 if none), purged rows included."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return 0 if row is None else int(row["seq"])

    # --- used inside other methods' transactions ------------------------------------------------

    def _record_change(
        self, db: sqlite3.Connection, node: str | None, kind: ChangeKind, reason: str, now: datetime
    ) -> int:
        cursor = db.execute(
            "INSERT INTO changes (at, node, kind, reason) VALUES (?, ?, ?, ?)",
            (ts(now), node, kind.value, reason),
        )
        return int(cursor.lastrowid or 0)

    def _purge_changes(self, db: sqlite3.Connection, now: datetime) -> None:
        db.execute("DELETE FROM changes WHERE at < ?", (ts(now - CHANGE_RETENTION),))

    def _notify_matching(
        self,
        db: sqlite3.Connection,
        selectors: Iterable[Mapping[str, str]],
        reason: str,
        now: datetime,
    ) -> list[str]:
        """Record CHANGED for every node that is not revoked and whose labels match any of
        ``selectors``; returns their names."""
        wanted = list(selectors)
        names = [
            row["name"]
            for row in db.execute(
                "SELECT name, labels FROM nodes WHERE state != ? ORDER BY name",
                (NodeState.REVOKED.value,),
            ).fetchall()
            if any(selector_matches(s, loads_map(row["labels"])) for s in wanted)
        ]
        for name in names:
            self._record_change(db, name, ChangeKind.CHANGED, reason, now)
        if names:
            self._purge_changes(db, now)
        return names

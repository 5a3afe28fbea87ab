"""The broker's database: SQLite (WAL), one transaction per method, rows in, frozen values out.

``Store`` is the one class the rest of the broker uses: nodes, nonces and enrollment challenges
here; allowlist, keys, grants, policies and audit in ``kbs.store_catalog``; the change feed in
``kbs.store_changes``; connection, migrations and transactions in ``kbs.store_db``. Thread-safe;
every ``sqlite3.Error`` becomes ``StoreError``. ``list_audit`` returns entries oldest first.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from datetime import datetime, timedelta

from kbs.errors import ActivationFailed, NodeEkConflict, NonceExpired, NonceUnknown, NotFound
from kbs.model import ChangeKind, Node, NodeState, PendingEnrollment
from kbs.store_catalog import Catalog
from kbs.store_db import BUSY_TIMEOUT, dumps_map, dumps_pcrs, loads_map, node_from_row, ts

__all__ = ["BUSY_TIMEOUT", "Store"]

MAX_NONCES_PER_NODE = 32
MAX_ENROLLMENTS_PER_NODE = 16
PURGE_GRACE = timedelta(hours=1)  # expired rows stay this long so the error says "expired"


class Store(Catalog):
    """The database. Open with ``Store.open(path)``; use as a context manager or ``close()``."""

    # --- nodes ------------------------------------------------------------------------------

    def get_node(self, name: str) -> Node | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
        return None if row is None else node_from_row(row)

    def _node_or_raise(self, db: sqlite3.Connection, name: str) -> Node:
        row = db.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no node named {name!r}; `keylease-kbs node list` shows the nodes")
        return node_from_row(row)

    def list_nodes(self) -> list[Node]:
        with self._tx(write=False) as db:
            return [node_from_row(r) for r in db.execute("SELECT * FROM nodes ORDER BY name")]

    def node_by_ek(self, ek_hash: str) -> Node | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT * FROM nodes WHERE ek_hash = ?", (ek_hash,)).fetchone()
        return None if row is None else node_from_row(row)

    def enroll_node(
        self,
        *,
        name: str,
        ek_hash: str,
        ek_public: bytes,
        ek_certificate: bytes,
        ak_public: bytes,
        state: NodeState,
        metadata: Mapping[str, str],
        now: datetime,
    ) -> Node:
        """Record a new node, or re-key the AK of a known node with the same EK (state and labels
        kept). A name bound to another EK, or this EK under another name: NodeEkConflict."""
        with self._tx() as db:
            by_name = db.execute("SELECT ek_hash FROM nodes WHERE name = ?", (name,)).fetchone()
            by_ek = db.execute("SELECT name FROM nodes WHERE ek_hash = ?", (ek_hash,)).fetchone()
            if by_name is not None and by_name["ek_hash"] != ek_hash:
                raise NodeEkConflict(
                    f"node {name!r} is enrolled with another EK (sha256 {by_name['ek_hash']}); "
                    f"this EK is {ek_hash}. If the node's TPM was replaced, revoke the old node "
                    "and enroll the new one under a new name"
                )
            if by_ek is not None and by_ek["name"] != name:
                raise NodeEkConflict(
                    f"this EK ({ek_hash}) is already enrolled as node {by_ek['name']!r}; a TPM "
                    f'enrolls under one name: set node_name = "{by_ek["name"]}" in the agent '
                    "config"
                )
            try:
                if by_name is None:
                    db.execute(
                        "INSERT INTO nodes (name, state, ek_hash, ek_public, ek_certificate, "
                        "ak_public, metadata, enrolled_at, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, state.value, ek_hash, ek_public, ek_certificate, ak_public,
                         dumps_map(metadata), ts(now), ts(now)),
                    )  # fmt: skip
                else:
                    db.execute(
                        "UPDATE nodes SET ek_certificate = ?, ak_public = ?, metadata = ?, "
                        "updated_at = ? WHERE name = ?",
                        (ek_certificate, ak_public, dumps_map(metadata), ts(now), name),
                    )
            except sqlite3.IntegrityError:
                raise NodeEkConflict(
                    f"node {name!r} or EK {ek_hash} was enrolled concurrently; retry"
                ) from None
            return self._node_or_raise(db, name)

    def _set_state(
        self, name: str, state: NodeState, labels: Mapping[str, str] | None, now: datetime
    ) -> Node:
        with self._tx() as db:
            self._node_or_raise(db, name)
            db.execute(
                "UPDATE nodes SET state = ?, updated_at = ? WHERE name = ?",
                (state.value, ts(now), name),
            )
            if labels is not None:
                db.execute("UPDATE nodes SET labels = ? WHERE name = ?", (dumps_map(labels), name))
            if state is NodeState.REVOKED:
                db.execute("DELETE FROM nonces WHERE node_name = ?", (name,))
                db.execute("DELETE FROM enrollments WHERE node_name = ?", (name,))
                self._record_change(db, name, ChangeKind.REVOKED, "revoked by the operator", now)
            else:
                self._record_change(
                    db, name, ChangeKind.CHANGED, "state or labels changed by the operator", now
                )
            self._purge_changes(db, now)
            return self._node_or_raise(db, name)

    def approve_node(self, name: str, labels: Mapping[str, str], now: datetime) -> Node:
        """Approve a node and replace its labels (a CHANGED row for it). NotFound if unknown."""
        return self._set_state(name, NodeState.APPROVED, labels, now)

    def revoke_node(self, name: str, now: datetime) -> Node:
        """Revoke a node and drop its outstanding nonces and challenges (a REVOKED row for it).
        NotFound if unknown."""
        return self._set_state(name, NodeState.REVOKED, None, now)

    def record_attestation(
        self,
        name: str,
        *,
        bank: str,
        pcrs: Mapping[int, bytes],
        reset_count: int | None,
        restart_count: int | None,
        now: datetime,
    ) -> None:
        """Store the PCR values and counters of a verified quote."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE nodes SET last_attested_at = ?, pcr_bank = ?, pcrs = ?, reset_count = ?, "
                "restart_count = ? WHERE name = ?",
                (ts(now), bank, dumps_pcrs(pcrs), reset_count, restart_count, name),
            )
            if cursor.rowcount != 1:
                raise NotFound(f"no node named {name!r}")

    # --- nonces and enrollment challenges -------------------------------------------------------

    def add_nonce(self, node_name: str, nonce: bytes, expires_at: datetime) -> None:
        """Record an issued nonce; only the newest ``MAX_NONCES_PER_NODE`` per node are kept."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO nonces (nonce, node_name, expires_at) VALUES (?, ?, ?)",
                (nonce, node_name, ts(expires_at)),
            )
            db.execute(
                "DELETE FROM nonces WHERE node_name = ? AND nonce NOT IN (SELECT nonce FROM "
                "nonces WHERE node_name = ? ORDER BY expires_at DESC LIMIT ?)",
                (node_name, node_name, MAX_NONCES_PER_NODE),
            )

    def consume_nonce(self, node_name: str, nonce: bytes, now: datetime) -> None:
        """Use a nonce up. The deletion is committed before any error is raised, so a nonce is
        single-use even if the attestation fails later. NonceUnknown / NonceExpired."""
        with self._tx() as db:
            row = db.execute(
                "SELECT expires_at FROM nonces WHERE node_name = ? AND nonce = ?",
                (node_name, nonce),
            ).fetchone()
            if row is not None:
                db.execute("DELETE FROM nonces WHERE nonce = ?", (nonce,))
            db.execute("DELETE FROM nonces WHERE expires_at < ?", (ts(now - PURGE_GRACE),))
        if row is None:
            raise NonceUnknown("nonce was not issued to this node or was already used")
        expires_at = datetime.fromisoformat(row["expires_at"])
        if now >= expires_at:
            raise NonceExpired(f"nonce expired at {expires_at.isoformat()}; get a new one")

    def add_enrollment(self, pending: PendingEnrollment) -> None:
        """Record a credential-activation challenge (the newest few per node name are kept)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO enrollments (id, node_name, ek_public, ek_certificate, ak_public, "
                "ek_hash, secret_sha256, metadata, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pending.id, pending.node_name, pending.ek_public, pending.ek_certificate,
                 pending.ak_public, pending.ek_hash, pending.secret_sha256,
                 dumps_map(pending.metadata), ts(pending.expires_at)),
            )  # fmt: skip
            db.execute(
                "DELETE FROM enrollments WHERE node_name = ? AND id NOT IN (SELECT id FROM "
                "enrollments WHERE node_name = ? ORDER BY expires_at DESC LIMIT ?)",
                (pending.node_name, pending.node_name, MAX_ENROLLMENTS_PER_NODE),
            )

    def take_enrollment(self, enrollment_id: str, now: datetime) -> PendingEnrollment:
        """Remove and return a challenge (single use). ActivationFailed if unknown or expired."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM enrollments WHERE id = ?", (enrollment_id,)).fetchone()
            if row is not None:
                db.execute("DELETE FROM enrollments WHERE id = ?", (enrollment_id,))
            db.execute("DELETE FROM enrollments WHERE expires_at < ?", (ts(now - PURGE_GRACE),))
        if row is None:
            raise ActivationFailed(
                "unknown or already used enrollment id; the agent must start enrollment again"
            )
        pending = PendingEnrollment(
            id=row["id"],
            node_name=row["node_name"],
            ek_public=row["ek_public"],
            ek_certificate=row["ek_certificate"],
            ak_public=row["ak_public"],
            ek_hash=row["ek_hash"],
            secret_sha256=row["secret_sha256"],
            metadata=loads_map(row["metadata"]),
            expires_at=datetime.fromisoformat(row["expires_at"]),
        )
        if now >= pending.expires_at:
            raise ActivationFailed(
                f"enrollment challenge expired at {pending.expires_at.isoformat()}; the agent "
                "must start enrollment again"
            )
        return pending

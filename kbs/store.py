"""The broker's database: SQLite (WAL) or PostgreSQL, one transaction per method, frozen values out.

``Store`` is the one class the rest of the broker uses: nodes, nonces and enrollment challenges
here; allowlist, keys, grants, policies and audit in ``kbs.store_catalog``; the change feed in
``kbs.store_changes``; engine, migrations and transactions in ``kbs.store_db``. Thread-safe;
every database error becomes ``StoreError``. ``list_audit`` returns entries oldest first.

Several brokers may share one PostgreSQL database. What is atomic, per call:
``consume_nonce`` is one ``DELETE ... RETURNING`` (a nonce is accepted once, by one replica);
``take_enrollment`` likewise; ``enroll_node`` is one transaction under the ``nodes`` unique
constraints, retried once on a race, so one name or EK never yields two nodes; operator changes
and their change-feed rows commit together. An attestation is several calls (nonce, then
``record_attestation`` with the audit rows of its outcome, one transaction): a broker killed
between them leaves the nonce used and no record of that attempt, which is by design (the nonce
is spent either way, nothing released).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa

from kbs.errors import (
    ActivationFailed,
    NodeEkConflict,
    NonceExpired,
    NonceUnknown,
    NotFound,
    UnknownNode,
)
from kbs.model import ChangeKind, Node, NodeState, PendingEnrollment
from kbs.store_catalog import AuditEvent, Catalog
from kbs.store_db import (
    BUSY_TIMEOUT,
    StoreConflict,
    dumps_map,
    dumps_pcrs,
    enrollments,
    loads_map,
    node_from_row,
    nodes,
    nonces,
    ts,
)

__all__ = ["BUSY_TIMEOUT", "AuditEvent", "Store"]

MAX_NONCES_PER_NODE = 32
MAX_ENROLLMENTS_PER_NODE = 16
PURGE_GRACE = timedelta(hours=1)  # expired rows stay this long so the error says "expired"
PURGE_EVERY = 10.0  # seconds between purges of expired nonces, and of challenges (per process)
ENROLL_ATTEMPTS = 3

P = sa.bindparam
# The attestation path's statements, compiled once per dialect (``Database._run``).
GET_NODE = sa.select(nodes).where(nodes.c.name == P("p_name"))
ADD_NONCE = nonces.insert().from_select(  # only for an enrolled node: no separate lookup
    ["nonce", "node_name", "expires_at"],
    sa.select(P("p_nonce", type_=sa.LargeBinary), nodes.c.name, P("p_exp", type_=sa.Text)).where(
        nodes.c.name == P("p_node")
    ),
)
CAP_NONCES = nonces.delete().where(
    nonces.c.node_name == P("p_node"),
    nonces.c.nonce.not_in(
        sa.select(nonces.c.nonce)
        .where(nonces.c.node_name == P("p_node"))
        .order_by(nonces.c.expires_at.desc())
        .limit(MAX_NONCES_PER_NODE)
    ),
)
PURGE_NONCES = nonces.delete().where(nonces.c.expires_at < P("p_cutoff"))
CONSUME_NONCE = (
    nonces.delete()
    .where(nonces.c.node_name == P("p_node"), nonces.c.nonce == P("p_nonce"))
    .returning(nonces.c.expires_at)
)
RECORD_ATTESTATION = (
    nodes.update()
    .where(nodes.c.name == P("p_name"))
    .values(last_attested_at=P("p_at"), pcr_bank=P("p_bank"), pcrs=P("p_pcrs"),
            reset_count=P("p_reset"), restart_count=P("p_restart"))
)  # fmt: skip


class Store(Catalog):
    """The database. Open with ``Store.open(path_or_url)``; a context manager, or ``close()``."""

    _next_purge: dict[str, float] = {}  # replaced per instance on first purge

    def _purge_due(self, table: str) -> bool:
        """True at most once per ``PURGE_EVERY`` per table (and process): expired rows are
        purged now and then, not on every request (the ``expires_at`` indexes keep it cheap)."""
        now = time.monotonic()
        if now < self._next_purge.get(table, 0.0):
            return False
        self._next_purge = {**self._next_purge, table: now + PURGE_EVERY}
        return True

    # --- nodes ------------------------------------------------------------------------------

    def get_node(self, name: str) -> Node | None:
        with self._tx(write=False, single=True) as db:
            row = self._run(db, GET_NODE, {"p_name": name}).mappings().first()
        return None if row is None else node_from_row(row)

    def _node_or_raise(self, db: sa.Connection, name: str) -> Node:
        row = db.execute(sa.select(nodes).where(nodes.c.name == name)).mappings().first()
        if row is None:
            raise NotFound(f"no node named {name!r}; `keylease-kbs node list` shows the nodes")
        return node_from_row(row)

    def list_nodes(self) -> list[Node]:
        with self._tx(write=False, single=True) as db:
            rows = db.execute(sa.select(nodes).order_by(nodes.c.name)).mappings().all()
        return [node_from_row(r) for r in rows]

    def count_nodes_by_state(self) -> dict[NodeState, int]:
        """How many nodes are in each state (one ``GROUP BY``; states with none are absent)."""
        query = sa.select(nodes.c.state, sa.func.count()).group_by(nodes.c.state)
        with self._tx(write=False, single=True) as db:
            return {NodeState(state): int(n) for state, n in db.execute(query).all()}

    def node_by_ek(self, ek_hash: str) -> Node | None:
        with self._tx(write=False, single=True) as db:
            row = db.execute(sa.select(nodes).where(nodes.c.ek_hash == ek_hash)).mappings().first()
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
        kept). A name bound to another EK, or this EK under another name: NodeEkConflict. A race
        with another writer (another replica) is retried, so its loser sees the winner's row."""
        for attempt in range(ENROLL_ATTEMPTS):
            try:
                return self._enroll_once(
                    name, ek_hash, ek_public, ek_certificate, ak_public, state, metadata, now
                )
            except StoreConflict:
                if attempt == ENROLL_ATTEMPTS - 1:
                    break
        raise NodeEkConflict(f"node {name!r} or EK {ek_hash} keeps being enrolled concurrently")

    def _enroll_once(
        self,
        name: str,
        ek_hash: str,
        ek_public: bytes,
        ek_certificate: bytes,
        ak_public: bytes,
        state: NodeState,
        metadata: Mapping[str, str],
        now: datetime,
    ) -> Node:
        with self._tx(catalog=False) as db:
            found = db.execute(
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
            if by_name is None:
                db.execute(
                    nodes.insert().values(
                        name=name, state=state.value, labels="{}", ek_hash=ek_hash,
                        ek_public=ek_public, ek_certificate=ek_certificate, ak_public=ak_public,
                        metadata=dumps_map(metadata), enrolled_at=ts(now), updated_at=ts(now),
                        pcrs="{}",
                    )
                )  # fmt: skip
            else:
                db.execute(
                    nodes.update()
                    .where(nodes.c.name == name)
                    .values(ek_certificate=ek_certificate, ak_public=ak_public,
                            metadata=dumps_map(metadata), updated_at=ts(now))
                )  # fmt: skip
            return self._node_or_raise(db, name)

    def _set_state(
        self, name: str, state: NodeState, labels: Mapping[str, str] | None, now: datetime
    ) -> Node:
        values: dict[str, str] = {"state": state.value, "updated_at": ts(now)}
        if labels is not None:
            values["labels"] = dumps_map(labels)
        with self._tx() as db:
            if db.execute(nodes.update().where(nodes.c.name == name).values(values)).rowcount != 1:
                raise NotFound(f"no node named {name!r}; `keylease-kbs node list` shows the nodes")
            if state is NodeState.REVOKED:
                db.execute(nonces.delete().where(nonces.c.node_name == name))
                db.execute(enrollments.delete().where(enrollments.c.node_name == name))
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
        events: Sequence[AuditEvent] = (),
    ) -> None:
        """Store the PCR values and counters of a verified quote, and the audit rows of its
        outcome (``events``: e.g. "attest ok" and "release"), in one transaction."""
        params = {"p_name": name, "p_at": ts(now), "p_bank": bank, "p_pcrs": dumps_pcrs(pcrs),
                  "p_reset": reset_count, "p_restart": restart_count}  # fmt: skip
        with self._tx(single=not events, catalog=False) as db:
            if self._run(db, RECORD_ATTESTATION, params).rowcount != 1:
                raise NotFound(f"no node named {name!r}")
            self._write_audit(db, events, now)

    # --- nonces and enrollment challenges -------------------------------------------------------

    def add_nonce(self, node_name: str, nonce: bytes, expires_at: datetime) -> None:
        """Record a nonce issued to an enrolled node (UnknownNode otherwise: nothing is written);
        only the newest ``MAX_NONCES_PER_NODE`` per node are kept."""
        with self._tx(catalog=False) as db:
            added = self._run(db, ADD_NONCE, {"p_nonce": nonce, "p_node": node_name,
                                              "p_exp": ts(expires_at)}).rowcount  # fmt: skip
            if added != 1:
                raise UnknownNode.not_enrolled(node_name)
            self._run(db, CAP_NONCES, {"p_node": node_name})
            if self._purge_due("nonces"):
                cutoff = ts(expires_at - PURGE_GRACE - timedelta(hours=1))
                self._run(db, PURGE_NONCES, {"p_cutoff": cutoff})

    def consume_nonce(self, node_name: str, nonce: bytes, now: datetime) -> None:
        """Use a nonce up: one ``DELETE ... RETURNING``, so exactly one caller (of any replica)
        gets it, and it is gone even if the attestation fails later. NonceUnknown / NonceExpired."""
        with self._tx(single=True, catalog=False) as db:
            expires = self._run(db, CONSUME_NONCE, {"p_node": node_name, "p_nonce": nonce}).scalar()
        if expires is None:
            raise NonceUnknown("nonce was not issued to this node or was already used")
        expires_at = datetime.fromisoformat(expires)
        if now >= expires_at:
            raise NonceExpired(f"nonce expired at {expires_at.isoformat()}; get a new one")

    def add_enrollment(self, pending: PendingEnrollment) -> None:
        """Record a credential-activation challenge (the newest few per node name are kept)."""
        newest = (
            sa.select(enrollments.c.id)
            .where(enrollments.c.node_name == pending.node_name)
            .order_by(enrollments.c.expires_at.desc())
            .limit(MAX_ENROLLMENTS_PER_NODE)
        )
        with self._tx(catalog=False) as db:
            db.execute(
                enrollments.insert().values(
                    id=pending.id, node_name=pending.node_name, ek_public=pending.ek_public,
                    ek_certificate=pending.ek_certificate, ak_public=pending.ak_public,
                    ek_hash=pending.ek_hash, secret_sha256=pending.secret_sha256,
                    metadata=dumps_map(pending.metadata), expires_at=ts(pending.expires_at),
                )
            )  # fmt: skip
            db.execute(
                enrollments.delete().where(
                    enrollments.c.node_name == pending.node_name, enrollments.c.id.not_in(newest)
                )
            )
            if self._purge_due("enrollments"):
                cutoff = ts(pending.expires_at - PURGE_GRACE - timedelta(hours=1))
                db.execute(enrollments.delete().where(enrollments.c.expires_at < cutoff))

    def take_enrollment(self, enrollment_id: str, now: datetime) -> PendingEnrollment:
        """Remove and return a challenge (single use, one ``DELETE ... RETURNING``).
        ActivationFailed if unknown or expired."""
        stmt = enrollments.delete().where(enrollments.c.id == enrollment_id).returning(enrollments)
        with self._tx(single=True, catalog=False) as db:
            row = db.execute(stmt).mappings().first()
        if row is None:
            raise ActivationFailed(
                "unknown or already used enrollment id; the agent must start enrollment again"
            )
        pending = PendingEnrollment(
            id=row["id"],
            node_name=row["node_name"],
            ek_public=bytes(row["ek_public"]),
            ek_certificate=bytes(row["ek_certificate"]),
            ak_public=bytes(row["ak_public"]),
            ek_hash=row["ek_hash"],
            secret_sha256=bytes(row["secret_sha256"]),
            metadata=loads_map(row["metadata"]),
            expires_at=datetime.fromisoformat(row["expires_at"]),
        )
        if now >= pending.expires_at:
            raise ActivationFailed(
                f"enrollment challenge expired at {pending.expires_at.isoformat()}; the agent "
                "must start enrollment again"
            )
        return pending

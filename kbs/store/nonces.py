"""Attestation nonces: issued to enrolled nodes only, each used at most once.

``consume_nonce`` is one ``DELETE ... RETURNING``, so exactly one caller (of any replica sharing
the database) gets a nonce, and it is gone even if the attestation fails later. Only the newest
``MAX_NONCES_PER_NODE`` of a node are kept; expired ones are purged now and then
(``kbs.store.expiry``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

from kbs.errors import NonceExpired, NonceUnknown, UnknownNode
from kbs.store.database import Database
from kbs.store.expiry import PURGE_GRACE, PurgeTimer
from kbs.store.tables import nodes, nonces, ts

__all__ = ["MAX_NONCES_PER_NODE", "add_nonce", "consume_nonce"]

MAX_NONCES_PER_NODE = 32

P = sa.bindparam
# The attestation path's statements, compiled once per dialect (``Database.run``).
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


def add_nonce(
    db: Database, purge: PurgeTimer, node_name: str, nonce: bytes, expires_at: datetime
) -> None:
    """Record a nonce issued to an enrolled node (UnknownNode otherwise: nothing is written)."""
    with db.tx(catalog=False) as conn:
        added = db.run(conn, ADD_NONCE, {"p_nonce": nonce, "p_node": node_name,
                                         "p_exp": ts(expires_at)}).rowcount  # fmt: skip
        if added != 1:
            raise UnknownNode.not_enrolled(node_name)
        db.run(conn, CAP_NONCES, {"p_node": node_name})
        if purge.due():
            cutoff = ts(expires_at - PURGE_GRACE - timedelta(hours=1))
            db.run(conn, PURGE_NONCES, {"p_cutoff": cutoff})


def consume_nonce(db: Database, node_name: str, nonce: bytes, now: datetime) -> None:
    """Use a nonce up; NonceUnknown / NonceExpired."""
    with db.tx(single=True, catalog=False) as conn:
        expires = db.run(conn, CONSUME_NONCE, {"p_node": node_name, "p_nonce": nonce}).scalar()
    if expires is None:
        raise NonceUnknown("nonce was not issued to this node or was already used")
    expires_at = datetime.fromisoformat(expires)
    if now >= expires_at:
        raise NonceExpired(f"nonce expired at {expires_at.isoformat()}; get a new one")

"""Attestation policies (PCR reference values) and the label selectors they are assigned to.

Setting a policy keeps its assignments; setting or assigning one records a CHANGED row for every
node it concerns (``kbs.store.changes``) in the same transaction, so those agents attest again.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import sqlalchemy as sa

from kbs.errors import NotFound, OperatorError
from kbs.model import Policy, format_selector, selector_matches
from kbs.store.changes import notify_matching
from kbs.store.database import Database
from kbs.store.tables import (
    dumps_map,
    dumps_pcrs,
    loads_map,
    loads_pcrs,
    policies,
    policy_assignments,
    ts,
)

__all__ = ["assign_policy", "list_policies", "policies_matching", "set_policy"]

P = sa.bindparam
ALL_POLICIES = (
    sa.select(policies, policy_assignments.c.selector)
    .outerjoin(policy_assignments, policy_assignments.c.policy_name == policies.c.name)
    .order_by(policies.c.name, policy_assignments.c.selector)
)
ONE_POLICY = ALL_POLICIES.where(policies.c.name == P("p_name"))


def _policies(db: Database, conn: sa.Connection, name: str | None = None) -> list[Policy]:
    """Policies (all, or the one named) with their assignments: one statement."""
    if name is None:
        result = db.run(conn, ALL_POLICIES, {})
    else:
        result = db.run(conn, ONE_POLICY, {"p_name": name})
    rows: dict[str, tuple[sa.RowMapping, list[dict[str, str]]]] = {}
    for row in result.mappings():
        entry = rows.setdefault(row["name"], (row, []))
        if row["selector"] is not None:
            entry[1].append(loads_map(row["selector"]))
    return [
        Policy(n, r["pcr_bank"], loads_pcrs(r["pcrs"]), tuple(sels))
        for n, (r, sels) in rows.items()
    ]


def set_policy(
    db: Database, name: str, bank: str, pcrs: Mapping[int, bytes], now: datetime
) -> Policy:
    """Create or replace a policy's reference values (its assignments are kept)."""
    if not pcrs:
        raise OperatorError("a policy needs at least one PCR; empty policy means deny")
    stmt = db.upsert(policies).values(
        name=name, pcr_bank=bank, pcrs=dumps_pcrs(pcrs), updated_at=ts(now)
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[policies.c.name],
        set_={c: stmt.excluded[c] for c in ("pcr_bank", "pcrs", "updated_at")},
    )
    with db.tx() as conn:
        conn.execute(stmt)
        policy = _policies(db, conn, name)[0]
        notify_matching(db, conn, policy.selectors, "an attestation policy changed", now)
        return policy


def assign_policy(db: Database, name: str, selector: Mapping[str, str], now: datetime) -> Policy:
    if not selector:
        raise OperatorError("a policy assignment needs a non-empty selector")
    stmt = db.upsert(policy_assignments).values(
        policy_name=name, selector=dumps_map(selector), created_at=ts(now)
    )
    with db.tx() as conn:
        if not _policies(db, conn, name):
            raise NotFound(
                f"no policy named {name!r}; create it with `keylease-kbs policy set {name} "
                "--pcrs 0,1,... --from-node NODE`"
            )
        if conn.execute(stmt.on_conflict_do_nothing().returning(sa.literal(1))).first() is None:
            raise OperatorError(
                f"policy {name!r} is already assigned to {format_selector(selector)}"
            )
        notify_matching(db, conn, [selector], "an attestation policy was assigned", now)
        return _policies(db, conn, name)[0]


def list_policies(db: Database) -> list[Policy]:
    with db.tx(write=False, single=True) as conn:
        return _policies(db, conn)


def policies_matching(db: Database, labels: Mapping[str, str]) -> tuple[Policy, ...]:
    """Policies with an assignment whose selector is within ``labels``, by name."""
    return tuple(
        p for p in list_policies(db) if any(selector_matches(s, labels) for s in p.selectors)
    )

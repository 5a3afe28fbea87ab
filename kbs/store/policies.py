"""Attestation policies (documents of allowed values per component) and the label selectors they
are assigned to.

Every change runs in one transaction that first checks the policy against every other policy a
node could be held to with it (``kbs.policy.merge``), then writes, then records a CHANGED row for
every node it concerns (``kbs.store.changes``), so those agents attest again. Writing a document
keeps the policy's assignments unless ``put_policy`` is given the selectors to hold exactly
(``policy apply``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa

from kbs.errors import NotFound, OperatorError
from kbs.model import Policy, format_selector, selector_matches
from kbs.policy.merge import check_compatible
from kbs.policy.rules import Document, document_from_json, document_json
from kbs.store.approvals import StatePush, add_states
from kbs.store.changes import notify_matching
from kbs.store.database import Database
from kbs.store.tables import dumps_map, loads_map, policies, policy_assignments, ts

__all__ = [
    "assign_policy",
    "get_policy",
    "list_policies",
    "policies_matching",
    "put_policy",
    "unassign_policy",
]

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
        Policy(n, document_from_json(r["document"]), tuple(sels)) for n, (r, sels) in rows.items()
    ]


def _not_found(name: str) -> NotFound:
    return NotFound(
        f"no policy named {name!r}; create it with `keylease-kbs policy learn {name} "
        "--from-node NODE` (or `policy apply FILE`)"
    )


def put_policy(
    db: Database,
    name: str,
    document: Document,
    now: datetime,
    selectors: Sequence[Mapping[str, str]] | None = None,
    pushes: Mapping[str, StatePush] | None = None,
) -> tuple[Policy | None, Policy]:
    """Create or replace a policy's document; with ``selectors``, also make its assignments
    exactly those; with ``pushes``, add approved states to nodes and let their change rows carry
    the approvals (a widened policy, ``kbs.approvals.widen``). Returns (before, after).
    OperatorError if it cannot pass together with another policy its nodes are held to."""
    stmt = db.upsert(policies).values(
        name=name, pcr_bank=document.bank, document=document_json(document), updated_at=ts(now)
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[policies.c.name],
        set_={c: stmt.excluded[c] for c in ("pcr_bank", "document", "updated_at")},
    )
    with db.tx() as conn:
        every = _policies(db, conn)
        before = next((p for p in every if p.name == name), None)
        kept = before.selectors if before is not None else ()
        wanted = tuple(selectors) if selectors is not None else kept
        check_compatible(Policy(name, document, wanted), every)
        conn.execute(stmt)
        touched = list(kept)
        if selectors is not None:
            for gone in (s for s in kept if s not in wanted):
                conn.execute(_unassign(name, gone))
            for new in (s for s in wanted if s not in kept):
                conn.execute(_assign(db, name, new, now))
            touched += [s for s in wanted if s not in kept]
        for node, push in (pushes or {}).items():
            add_states(db, conn, node, push.states, now)
        payloads = {node: push.payload for node, push in (pushes or {}).items()}
        notify_matching(db, conn, touched, "an attestation policy changed", now, payloads)
        return before, _policies(db, conn, name)[0]


def _assign(db: Database, name: str, selector: Mapping[str, str], now: datetime) -> sa.Executable:
    stmt = db.upsert(policy_assignments).values(
        policy_name=name, selector=dumps_map(selector), created_at=ts(now)
    )
    return stmt.on_conflict_do_nothing()  # type: ignore[no-any-return]


def _unassign(name: str, selector: Mapping[str, str]) -> sa.Delete:
    return policy_assignments.delete().where(
        policy_assignments.c.policy_name == name,
        policy_assignments.c.selector == dumps_map(selector),
    )


def assign_policy(db: Database, name: str, selector: Mapping[str, str], now: datetime) -> Policy:
    if not selector:
        raise OperatorError("a policy assignment needs a non-empty selector")
    with db.tx() as conn:
        every = _policies(db, conn)
        policy = next((p for p in every if p.name == name), None)
        if policy is None:
            raise _not_found(name)
        if selector in policy.selectors:
            raise OperatorError(
                f"policy {name!r} is already assigned to {format_selector(selector)}"
            )
        check_compatible(Policy(name, policy.document, (*policy.selectors, selector)), every)
        conn.execute(_assign(db, name, selector, now))
        notify_matching(db, conn, [selector], "an attestation policy was assigned", now)
        return _policies(db, conn, name)[0]


def unassign_policy(db: Database, name: str, selector: Mapping[str, str], now: datetime) -> None:
    with db.tx() as conn:
        if conn.execute(_unassign(name, selector)).rowcount != 1:
            raise NotFound(f"policy {name!r} is not assigned to {format_selector(selector)}")
        notify_matching(db, conn, [selector], "an attestation policy was unassigned", now)


def get_policy(db: Database, name: str) -> Policy:
    with db.tx(write=False, single=True) as conn:
        found = _policies(db, conn, name)
    if not found:
        raise _not_found(name)
    return found[0]


def list_policies(db: Database) -> list[Policy]:
    with db.tx(write=False, single=True) as conn:
        return _policies(db, conn)


def policies_matching(db: Database, labels: Mapping[str, str]) -> tuple[Policy, ...]:
    """Policies with an assignment whose selector is within ``labels``, by name."""
    return tuple(
        p for p in list_policies(db) if any(selector_matches(s, labels) for s in p.selectors)
    )

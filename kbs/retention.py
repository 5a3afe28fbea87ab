"""Audit retention: audit rows older than ``audit_retention_days`` are deleted, every hour.

Every broker sharing a database prunes (the deletion is idempotent; replicas racing delete each
row once). ``audit_retention_days = 0`` keeps every row. A database error is counted and logged
and the next round tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from kbs.errors import StoreError
from kbs.nodeapi.metrics import BrokerMetrics
from kbs.store import Store

__all__ = ["PRUNE_INTERVAL", "prune_audit_forever", "prune_audit_once"]

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 3600.0


async def prune_audit_once(store: Store, days: int, metrics: BrokerMetrics, now: datetime) -> int:
    """Delete the audit rows older than ``days`` days before ``now``; returns how many."""
    try:
        deleted = await asyncio.to_thread(store.prune_audit, now - timedelta(days=days))
    except StoreError as exc:
        metrics.db_errors.inc()
        log.warning("audit retention: cannot delete old rows (%s); trying again later", exc)
        return 0
    if deleted:
        metrics.audit_pruned.inc(deleted)
        log.info("audit retention: deleted %d row(s) older than %d days", deleted, days)
    return deleted


async def prune_audit_forever(
    store: Store,
    days: int,
    metrics: BrokerMetrics,
    clock: Callable[[], datetime],
    interval: float = PRUNE_INTERVAL,
) -> None:
    """``prune_audit_once`` now and every ``interval`` seconds (until cancelled)."""
    while True:
        await prune_audit_once(store, days, metrics, clock())
        await asyncio.sleep(interval)

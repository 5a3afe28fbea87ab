"""The daemon's lease (agent.daemon.lease): measured on the monotonic clock, so that the node's
wall clock, wrong or stepped, neither ends it early nor extends it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent.daemon.lease import Lease

ISSUED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_a_received_lease_lasts_its_length_from_when_the_attestation_began() -> None:
    lease = Lease.received(ISSUED, ISSUED + timedelta(seconds=600), asked_at=1000.0)
    assert lease.deadline == 1600.0
    assert lease.remaining(lambda: 1100.0) == 500.0
    assert not lease.ended(lambda: 1599.9)
    assert lease.ended(lambda: 1600.0)
    # whatever the node's wall clock says: it is not consulted
    assert Lease.received(ISSUED, ISSUED - timedelta(seconds=5), asked_at=7.0).deadline == 7.0


def test_a_restored_lease_is_judged_by_the_wall_clock_once() -> None:
    not_after = ISSUED + timedelta(seconds=300)
    lease = Lease.restored(not_after, ISSUED + timedelta(seconds=100), clock=lambda: 50.0)
    assert lease.deadline == 250.0  # 200 s left at restore, counted monotonically from then
    assert Lease.restored(not_after, not_after + timedelta(hours=1), clock=lambda: 50.0).ended(
        lambda: 50.0
    )

"""Start-up (DESIGN.md step 5): keys back from the sealed cache, with the TPM only, no network.

Restored only if the cached release is signed by the broker and opens in this TPM under one of
the broker's approvals held in the state directory: for the PCR values the TPM holds now, the
TPM's clock below its limit (``agent.approvals``). The node's wall clock is not consulted for
what opens: the lease is the TPM's clock too (``agent.daemon.lease``). The log says which
approved state opened it (policy, components, where the approval came from). Otherwise, what
stays:

- the lease ended in the TPM's clock (the release's ``lease_clock_limit``, recorded beside the
  cache; the wall clock for a cache from a broker before issue 11): a verified reason, so the keys
  go, and the cache with them;
- no cache at all: nothing backs installed keys, so they go;
- the cache does not restore for any other reason (no approved state matches this boot — the
  message names the component that differs from every approved state —, the approval expired,
  is not the broker's or is for another policy group, the cache not signed by the broker —
  planted or altered —, nonsense lease times, damaged, another TPM's, the TPM not answering yet):
  nothing a stranger can do removes keys. The cache stays (the next release replaces it) and keys
  installed before this start stay until the lease the agent last recorded (``status.json``: in
  TPM time when the TPM answers; at most ``MAX_LEASE_SECONDS`` from now) ends, then go; without a
  recorded lease they go now.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from agent.approvals import open_approved
from agent.bootlog import read_event_log
from agent.config import AgentConfig
from agent.daemon.lease import Lease
from agent.errors import AgentError, NoApprovedState
from agent.keystore import (
    ApprovalStore,
    PcrReader,
    SealedCache,
    clear_key_directories,
    install_keys,
    key_directories,
    key_file_name,
    remove_all_keys,
)
from agent.logsetup import log_fields
from agent.release import Bundle
from agent.signature import ReleaseTrust
from agent.state import StateDir
from agent.status import load_status
from agent.tpm import Tpm, TpmClock
from keylease.api.v1.approvals import Approval
from keylease.api.v1.limits import MAX_LEASE_SECONDS

__all__ = ["Restored", "restore_from_cache"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    bundle: Bundle | None  # the keys now installed from the cache, or None
    reason: str = ""  # why nothing was restored
    kept: tuple[tuple[str, int], ...] = ()  # keys installed before, kept until ``lease`` ends
    lease: Lease | None = None  # of the restored bundle, or of the keys kept
    approval: Approval | None = None  # what opened the cache (None: a cache before issue 11)
    clock: TpmClock | None = None  # the TPM's clock at the restore


class _LeaseEnded(Exception):
    """Internal: the cached release's lease is over (keys and cache go)."""


def restore_from_cache(cfg: AgentConfig, state: StateDir) -> Restored:
    """Reinstall keys from the sealed cache if this TPM, in this state, opens it."""
    cache = SealedCache(state)
    store = ApprovalStore(state)
    try:
        release = cache.load()
        if release is None:
            return _nothing_restored(cfg, cache, "no sealed cache yet")
        trust = ReleaseTrust.load(cfg.kbs_ca)
        with Tpm.open(cfg.tcti) as tpm:
            now = tpm.clock()
            limit = cache.lease_clock_limit() if release.policy_group else None
            if limit is not None and now.clock >= limit:
                raise _LeaseEnded(
                    f"the sealed cache's lease ended at TPM clock {limit} (the TPM's clock is "
                    f"{now.clock}); not restoring it"
                )
            opened = open_approved(
                tpm, release, cfg.node_name, trust, store.load(),
                lambda: read_event_log(cfg.event_log), clock=now.clock,
            )  # fmt: skip
        bundle = opened.bundle
        lease = _lease(bundle, opened.approval, now)
        install_keys(cfg, bundle.keys)
    except _LeaseEnded as exc:
        return _nothing_restored(cfg, cache, str(exc), drop=True)
    except AgentError as exc:
        changed = "" if isinstance(exc, NoApprovedState) else cache.changed_pcrs(_pcr_reader(cfg))
        return _kept(cfg, state, cache, exc.diagnostics() + changed)
    store.merge((), now.clock)  # drop what expired
    used = f" with approved state {opened.approval.describe()}" if opened.approval else ""
    log.info(
        "restored %s from the sealed cache%s; lease until %s (TPM clock %d, now %d)",
        bundle.describe(),
        used,
        bundle.not_after.isoformat(),
        bundle.lease_clock_limit,
        now.clock,
        extra=log_fields(cfg.node_name, "restored"),
    )
    return Restored(bundle, lease=lease, approval=opened.approval, clock=now)


def _lease(bundle: Bundle, approval: Approval | None, now: TpmClock) -> Lease:
    """The restored bundle's lease: in the TPM's clock; by the wall clock for a cache from a
    broker before issue 11 (which says nothing of TPM time), refused once it ended."""
    if approval is not None and bundle.lease_clock_limit:
        return Lease.in_tpm_time(bundle.not_after, bundle.lease_clock_limit, now.clock)
    wall = datetime.now(UTC)
    if bundle.not_after <= wall:
        raise _LeaseEnded(
            f"the sealed cache's lease ended at {bundle.not_after.isoformat()}; not restoring it"
        )
    return Lease.restored(bundle.not_after, wall)


def _pcr_reader(cfg: AgentConfig) -> PcrReader:
    def read(bank: str, indices: Sequence[int]) -> Mapping[int, bytes]:
        with Tpm.open(cfg.tcti) as tpm:
            return tpm.read_pcrs(bank, indices)

    return read


def _kept(cfg: AgentConfig, state: StateDir, cache: SealedCache, reason: str) -> Restored:
    """The cache did not restore for a reason that is not a verdict: keep what is installed
    until the recorded lease ends (clear it now if none is recorded)."""
    status = load_status(state)
    wall = datetime.now(UTC)
    until = status.lease_not_after if status is not None else None
    lease = _recorded_lease(cfg, until, status.lease_clock_limit if status else None, wall)
    if status is None or until is None or lease is None:
        return _nothing_restored(cfg, cache, reason)
    try:
        present = {name for kd in key_directories(cfg) for name in kd.installed()}
    except AgentError:
        present = set()
    kept = tuple(
        (name, version) for name, version in status.keys if key_file_name(name, version) in present
    )
    if not kept:  # e.g. after a reboot: the key tmpfs is empty
        return _nothing_restored(cfg, cache, reason)
    log.warning(
        "nothing restored from the sealed cache: %s; the keys installed before stay until the "
        "recorded lease ends (in %.0f s)",
        reason,
        lease.remaining(),
        extra=log_fields(cfg.node_name, "not-restored", reason),
    )
    return Restored(None, reason, kept=kept, lease=lease)


def _recorded_lease(
    cfg: AgentConfig, until: datetime | None, clock_limit: int | None, wall: datetime
) -> Lease | None:
    """The lease ``status.json`` recorded: in TPM time when it says where the lease ends there
    and the TPM answers, else by the wall clock; None when it ended (or none is recorded)."""
    if until is None:
        return None
    lease = None
    if clock_limit:
        try:
            with Tpm.open(cfg.tcti) as tpm:
                lease = Lease.in_tpm_time(until, clock_limit, tpm.clock().clock)
        except AgentError as exc:
            log.debug(
                "the TPM's clock cannot be read (%s); judging the lease by the wall clock", exc
            )
    if lease is None:
        bounded = min(until, wall + timedelta(seconds=MAX_LEASE_SECONDS))
        lease = Lease.restored(until, wall) if bounded > wall else None
        if lease is not None:
            lease = Lease(until, lease.deadline - (until - bounded).total_seconds())
    return lease if lease is not None and not lease.ended() else None


def _nothing_restored(
    cfg: AgentConfig, cache: SealedCache, reason: str, *, drop: bool = False
) -> Restored:
    """Clear the key directories (and the cache if ``drop``), and say why."""
    removed = remove_all_keys(cfg, cache) if drop else clear_key_directories(cfg)
    log.warning(
        "nothing restored from the sealed cache: %s%s",
        reason,
        f"; removed {len(removed)} stale key file(s)" if removed else "",
        extra=log_fields(cfg.node_name, "not-restored", reason),
    )
    return Restored(None, reason)

"""Start-up (DESIGN.md step 5): keys back from the sealed cache, with the TPM only, no network.

Restored only if the cached release is signed by the broker, opens in this TPM in this measured
state, and its lease has not ended. Otherwise, what stays:

- the lease ended: a verified reason, so the keys go, and the cache with them;
- no cache at all: nothing backs installed keys, so they go;
- the cache does not restore for any other reason (not signed by the broker — planted or
  altered —, nonsense lease times, damaged, does not open in this TPM or PCR state, the TPM not
  answering yet): nothing a stranger can do removes keys. The cache stays (the next release
  replaces it) and keys installed before this start stay until the lease the agent last
  recorded (``status.json``; at most ``MAX_LEASE_SECONDS`` from now) ends, then go; without a
  recorded lease they go now. The reason says which PCR changed when that can be told.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.keystore import (
    PcrReader,
    SealedCache,
    clear_key_directories,
    install_keys,
    key_directories,
    key_file_name,
    remove_all_keys,
)
from agent.logsetup import log_fields
from agent.release import Bundle, open_release
from agent.signature import ReleaseTrust
from agent.state import StateDir
from agent.status import load_status
from agent.tpm import Tpm
from keylease.api.v1.limits import MAX_LEASE_SECONDS

__all__ = ["Restored", "restore_from_cache"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    bundle: Bundle | None  # the keys now installed from the cache, or None
    reason: str = ""  # why nothing was restored
    kept: tuple[tuple[str, int], ...] = ()  # keys installed before, kept until ``kept_until``
    kept_until: datetime | None = None


class _LeaseEnded(Exception):
    """Internal: the cached release's lease is over (keys and cache go)."""


def restore_from_cache(cfg: AgentConfig, state: StateDir) -> Restored:
    """Reinstall keys from the sealed cache if this TPM, in this state, opens it."""
    cache = SealedCache(state)
    try:
        release = cache.load()
        if release is None:
            return _nothing_restored(cfg, cache, "no sealed cache yet")
        trust = ReleaseTrust.load(cfg.kbs_ca)
        with Tpm.open(cfg.tcti) as tpm:
            bundle = open_release(tpm, release, cfg.node_name, trust)
        if bundle.not_after <= datetime.now(UTC):
            raise _LeaseEnded(
                f"the sealed cache's lease ended at {bundle.not_after.isoformat()}; not "
                "restoring it"
            )
        install_keys(cfg, bundle.keys)
    except _LeaseEnded as exc:
        return _nothing_restored(cfg, cache, str(exc), drop=True)
    except AgentError as exc:
        reason = exc.diagnostics() + cache.changed_pcrs(_pcr_reader(cfg))
        return _kept(cfg, state, cache, reason)
    log.info(
        "restored %s from the sealed cache, lease until %s",
        bundle.describe(),
        bundle.not_after.isoformat(),
        extra=log_fields(cfg.node_name, "restored"),
    )
    return Restored(bundle)


def _pcr_reader(cfg: AgentConfig) -> PcrReader:
    def read(bank: str, indices: Sequence[int]) -> Mapping[int, bytes]:
        with Tpm.open(cfg.tcti) as tpm:
            return tpm.read_pcrs(bank, indices)

    return read


def _kept(cfg: AgentConfig, state: StateDir, cache: SealedCache, reason: str) -> Restored:
    """The cache did not restore for a reason that is not a verdict: keep what is installed
    until the recorded lease ends (clear it now if none is recorded)."""
    status = load_status(state)
    now = datetime.now(UTC)
    until = status.lease_not_after if status is not None else None
    if status is None or until is None or until <= now:
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
    until = min(until, now + timedelta(seconds=MAX_LEASE_SECONDS))
    log.warning(
        "nothing restored from the sealed cache: %s; the keys installed before stay until the "
        "recorded lease ends at %s",
        reason,
        until.isoformat(),
        extra=log_fields(cfg.node_name, "not-restored", reason),
    )
    return Restored(None, reason, kept=kept, kept_until=until)


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

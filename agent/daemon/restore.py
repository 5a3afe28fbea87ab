"""Start-up (DESIGN.md step 5): keys back from the sealed cache, with the TPM only, no network.

Restored only if this TPM, in this measured state, opens the cached release and its lease has
not ended. Otherwise nothing may stay installed that a valid cache does not back: the key
directories are cleared, and the cache itself is dropped when it can never open again (an
invalid release or key); the reason says which PCR changed when that can be told.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.config import AgentConfig
from agent.errors import AgentError, InvalidKey, ReleaseInvalid
from agent.keystore import (
    PcrReader,
    SealedCache,
    clear_key_directories,
    install_keys,
    remove_all_keys,
)
from agent.logsetup import log_fields
from agent.release import Bundle, open_release
from agent.state import StateDir
from agent.tpm import Tpm

__all__ = ["Restored", "restore_from_cache"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    bundle: Bundle | None  # the keys now installed, or None
    reason: str = ""  # why nothing was restored


def restore_from_cache(cfg: AgentConfig, state: StateDir) -> Restored:
    """Reinstall keys from the sealed cache if this TPM, in this state, opens it."""
    cache = SealedCache(state)
    try:
        release = cache.load()
    except ReleaseInvalid as exc:
        reason = exc.diagnostics() + cache.changed_pcrs(_pcr_reader(cfg))
        return _nothing_restored(cfg, cache, drop=True, reason=reason)
    if release is None:
        return _nothing_restored(cfg, cache, drop=False, reason="no sealed cache yet")
    try:
        with Tpm.open(cfg.tcti) as tpm:
            bundle = open_release(tpm, release, cfg.node_name)
        if bundle.not_after <= datetime.now(UTC):
            raise ReleaseInvalid(
                f"the sealed cache's lease ended at {bundle.not_after.isoformat()}; "
                "not restoring it"
            )
        install_keys(cfg, bundle.keys)
    except AgentError as exc:
        drop = isinstance(exc, ReleaseInvalid | InvalidKey)
        reason = exc.diagnostics() + cache.changed_pcrs(_pcr_reader(cfg))
        return _nothing_restored(cfg, cache, drop=drop, reason=reason)
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


def _nothing_restored(cfg: AgentConfig, cache: SealedCache, *, drop: bool, reason: str) -> Restored:
    """Clear the key directories (and the cache if ``drop``), and say why."""
    removed = remove_all_keys(cfg, cache) if drop else clear_key_directories(cfg)
    log.warning(
        "nothing restored from the sealed cache: %s%s",
        reason,
        f"; removed {len(removed)} stale key file(s)" if removed else "",
        extra=log_fields(cfg.node_name, "not-restored", reason),
    )
    return Restored(None, reason)

"""The node's keys across every configured key directory: install, clear, remove with the cache.

Plaintext keys go only where memory backs them (tmpfs/ramfs), unless the operator set
``unsafe_allow_disk_key_dirs`` (a warning each time). Removal clears every directory before it
reports a failure in one of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agent.config import AgentConfig
from agent.errors import KeystoreError
from agent.keystore.cache import SealedCache
from agent.keystore.keydir import InstallableKey, KeyDirectory
from agent.keystore.memfs import is_memory_backed, require_memory_backed

__all__ = ["clear_key_directories", "install_keys", "key_directories", "remove_all_keys"]

log = logging.getLogger(__name__)


def key_directories(cfg: AgentConfig) -> list[KeyDirectory]:
    return [KeyDirectory(d) for d in cfg.key_dirs]


def install_keys(
    cfg: AgentConfig, keys: Sequence[InstallableKey]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Install ``keys`` into every key directory (memory-backed only, unless the operator set
    unsafe_allow_disk_key_dirs). Returns (files present, files removed)."""
    directories = key_directories(cfg)
    for kd in directories:
        if cfg.unsafe_allow_disk_key_dirs:
            if not _memory_backed(kd):
                log.warning(
                    "unsafe_allow_disk_key_dirs: installing plaintext keys into %s, which is "
                    "not on tmpfs",
                    kd.directory,
                )
        else:
            require_memory_backed(kd.directory)
    installed: list[str] = []
    removed: list[str] = []
    for kd in directories:
        result = kd.sync(keys)
        installed += [f"{kd.directory}/{n}" for n in result.installed + result.unchanged]
        removed += [f"{kd.directory}/{n}" for n in result.removed]
    return tuple(installed), tuple(removed)


def _memory_backed(kd: KeyDirectory) -> bool:
    try:
        return is_memory_backed(kd.directory)
    except OSError:
        return False


def clear_key_directories(cfg: AgentConfig) -> tuple[str, ...]:
    """Remove every key file this agent installed; the sealed cache stays. Returns the file
    names."""
    removed: list[str] = []
    for kd in key_directories(cfg):
        removed += kd.clear()
    return tuple(removed)


def remove_all_keys(cfg: AgentConfig, cache: SealedCache) -> tuple[str, ...]:
    """Remove every key this agent installed, and the cached release. Returns what was removed."""
    removed: list[str] = []
    failures: list[KeystoreError] = []
    for kd in key_directories(cfg):
        try:
            removed += [f"{kd.directory}/{name}" for name in kd.clear()]
        except KeystoreError as exc:  # clear every other directory before reporting it
            failures.append(exc)
    cache.drop()
    if failures:
        raise KeystoreError("; ".join(str(f) for f in failures))
    return tuple(removed)

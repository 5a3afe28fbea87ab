"""Is a key directory memory-backed? Plaintext keys must never reach a disk (DESIGN.md step 4).

The agent does not mount anything: the shipped systemd mount units put a tmpfs on each
``<key_dir>/keylease``. Before installing, the agent checks that the directory it will write to
(or, when it does not exist yet, the nearest existing ancestor it would be created in) lives on
tmpfs or ramfs, and refuses otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from agent.errors import KeystoreError

__all__ = ["filesystem_type", "is_memory_backed", "require_memory_backed"]

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
_STATFS_SIZE = 256  # struct statfs is 120 bytes on 64-bit Linux; f_type is its first word

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def filesystem_type(path: Path) -> int:
    """statfs(2) f_type of ``path``; raises OSError."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def is_memory_backed(path: Path) -> bool:
    return filesystem_type(_nearest_existing(path)) in (TMPFS_MAGIC, RAMFS_MAGIC)


def require_memory_backed(directory: Path) -> None:
    """Raise KeystoreError unless ``directory`` is (or would be created) on tmpfs/ramfs."""
    try:
        ok = is_memory_backed(directory)
    except OSError as exc:
        raise KeystoreError(f"cannot check the filesystem of {directory}: {exc.strerror}") from None
    if not ok:
        unit = _unit_name(directory)
        raise KeystoreError(
            f"{directory} is not on a tmpfs, so plaintext keys would reach a disk; mount one "
            f"there (systemctl enable --now {unit}, from keylease's systemd/ directory) or set "
            "unsafe_allow_disk_key_dirs = true in the agent config"
        )


def _unit_name(directory: Path) -> str:
    """What `systemd-escape --path --suffix=mount` gives for ordinary paths."""
    parts = [p.replace("-", "\\x2d") for p in directory.parts if p != "/"]
    return "-".join(parts) + ".mount"

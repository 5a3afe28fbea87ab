"""Directory-fd primitives for the key directories, and their one OSError boundary.

Every directory is opened with ``O_NOFOLLOW`` and every change goes through a directory fd, so a
symlink swapped in can't redirect a write. ``OSError`` becomes ``KeystoreError`` here, naming
the path and what failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from agent.errors import KeystoreError

__all__ = ["TEMP_FILE", "io_errors", "kind", "open_dir", "temp_name", "write_all"]

TEMP_FILE = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._-]{0,80}\.pem\..+")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def io_errors(action: str, path: Path) -> Iterator[None]:
    """The one OSError -> KeystoreError boundary."""
    try:
        yield
    except OSError as exc:
        raise KeystoreError(f"cannot {action} {path}: {exc.strerror or exc}") from None


def kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file"


def temp_name(file: str) -> str:
    """A hidden temp name for key file ``file`` (``.<file>.<random>``, ``file`` ending in
    ``.pem``), matching TEMP_FILE."""
    return f".{file}.{secrets.token_hex(8)}"


def _refused_dir(path: Path, name: str, dir_fd: int | None) -> KeystoreError:
    """The error for a directory we would not open: a symlink or not a directory."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        return KeystoreError(
            f"{path} is a symlink; container runtimes refuse symlinks in their key directory and "
            f"so does keylease-agent: replace it with a real directory or list the real path in "
            f"key_dirs"
        )
    return KeystoreError(
        f"{path} is {kind(mode) if mode else 'not a directory'}, not a directory: "
        f"move it away or change key_dirs"
    )


def open_dir(path: Path, name: str, dir_fd: int | None) -> int:
    """Open a directory without following a symlink at its last component."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refused_dir(path, name, dir_fd) from None
        raise


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]

"""The staging directory for filesystems without ``O_TMPFILE``.

``<root>/../.keylease-staging-<basename>``: outside the tree the runtimes walk, on the same
filesystem as ``<root>`` (usually). A key file is written complete there, fsynced, and renamed
into ``<root>/keylease/``; the directory is removed after use, and anything in it that
keylease-agent did not write is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from agent.errors import KeystoreError
from agent.keystore.dirfd import TEMP_FILE, io_errors, open_dir, temp_name, write_all

__all__ = ["Staging"]


class Staging:
    """The staging directory next to one key directory ``root``; ``remove()`` after use."""

    def __init__(self, root: Path) -> None:
        self.name = f".keylease-staging-{root.name}"
        self.path = root.parent / self.name
        self._parent_fd: int | None = None
        self._fd: int | None = None

    def _open(self, create: bool) -> int | None:
        if self._fd is not None:
            return self._fd
        with io_errors("create", self.path):
            if self._parent_fd is None:
                try:
                    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                    self._parent_fd = os.open(self.path.parent, flags)
                except FileNotFoundError:
                    if create:
                        raise
                    return None
            parent = self._parent_fd
            try:
                if not create:
                    os.stat(self.name, dir_fd=parent, follow_symlinks=False)
                else:
                    os.mkdir(self.name, 0o700, dir_fd=parent)
            except FileNotFoundError:
                return None
            except FileExistsError:
                pass
            self._fd = open_dir(self.path, self.name, parent)
            for entry in os.listdir(self._fd):
                if not TEMP_FILE.fullmatch(entry):
                    raise KeystoreError(
                        f"{self.path / entry} was not written by keylease-agent; remove it, "
                        f"{self.path} is keylease-agent's staging directory"
                    )
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=self._fd)
        return self._fd

    def publish(self, own_fd: int, own: Path, file: str, data: bytes) -> None:
        """Write a complete temp file here, then rename it into ``own`` as ``file``."""
        staging = self._open(create=True)
        assert staging is not None
        temp = temp_name(file)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with io_errors("write a key file in", self.path):
            fd = os.open(temp, flags, 0o600, dir_fd=staging)
            try:
                try:
                    os.fchmod(fd, 0o600)
                    write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temp, file, src_dir_fd=staging, dst_dir_fd=own_fd)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise KeystoreError(
                        f"the filesystem of {own} supports no O_TMPFILE and {self.path} is on "
                        f"another filesystem: put the key directory on a tmpfs"
                    ) from None
                raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=staging)  # gone after a successful rename

    def remove(self) -> None:
        """Remove leftovers and the directory itself (if it exists), and close everything."""
        try:
            if self._open(create=False) is not None and self._parent_fd is not None:
                with io_errors("remove", self.path):
                    os.rmdir(self.name, dir_fd=self._parent_fd)
        finally:
            for fd in (self._fd, self._parent_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._parent_fd = None

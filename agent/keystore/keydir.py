"""One runtime key directory: installing released keys into it, atomically and safely.

CRI-O and containerd's ctd-decoder walk their key directory recursively on every encrypted pull and
fail on anything they cannot parse, and on any symlink. So:

- the agent owns only ``<root>/keylease/`` and the key files in it, one per key version:
  ``<name>.v<version>.pem`` (``agent.keystore.keyfile``); nothing else in ``<root>`` is ever
  touched;
- every directory is opened with ``O_NOFOLLOW`` and every change goes through a directory fd, so a
  symlink swapped in can't redirect a write (``agent.keystore.dirfd``);
- a file appears only complete: its content is written to an unnamed ``O_TMPFILE`` inode, fsynced,
  and only then linked into place (a new name) or linked to a hidden temp name and renamed over the
  old file (a changed key). Where the filesystem has no ``O_TMPFILE``, a temp file is written in a
  sibling staging directory outside the walked tree and renamed into place
  (``agent.keystore.staging``).
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import InvalidKey, KeystoreError
from agent.keystore.dirfd import TEMP_FILE, io_errors, kind, open_dir, temp_name, write_all
from agent.keystore.keyfile import key_file_name, parse_key_file, validate_version
from agent.keystore.ocikey import check_pem_shape
from agent.keystore.staging import Staging
from keylease.secret import Secret

__all__ = ["OWNED_DIR", "InstallableKey", "KeyDirectory", "SyncResult"]

log = logging.getLogger(__name__)

OWNED_DIR = "keylease"
_O_TMPFILE: int | None = getattr(os, "O_TMPFILE", None)
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR)


@dataclass(frozen=True)
class InstallableKey:
    name: str
    version: int
    pem: Secret

    @property
    def file_name(self) -> str:
        """``<name>.v<version>.pem``: each version of a key has a file of its own."""
        return key_file_name(self.name, self.version)


@dataclass(frozen=True)
class SyncResult:
    """Key file names (``<name>.v<version>.pem``) by what a sync did to them."""

    installed: tuple[str, ...]
    unchanged: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True)
class _Listing:
    keys: dict[str, os.stat_result]
    temps: tuple[str, ...]
    foreign: tuple[str, ...]


class KeyDirectory:
    """One runtime key directory (e.g. ``/etc/crio/keys``); the agent writes only ``keylease/``.

    ``o_tmpfile=False`` forces the staging-directory path used on filesystems without O_TMPFILE.
    """

    def __init__(self, root: Path, *, o_tmpfile: bool = True) -> None:
        self.root = Path(root)
        self.directory = self.root / OWNED_DIR
        self._o_tmpfile = o_tmpfile and _O_TMPFILE is not None and os.path.isdir("/proc/self/fd")

    # -- public API -------------------------------------------------------------------------

    def sync(self, keys: Sequence[InstallableKey]) -> SyncResult:
        """Install new and changed key versions (a file each), then remove owned key files not
        in ``keys``."""
        for key in keys:  # fully parsed when the release was opened; re-check the file shape
            check_pem_shape(key.name, key.pem)
            validate_version(key.name, key.version)
        files = [key.file_name for key in keys]
        wanted = set(files)
        if len(wanted) != len(keys):
            twice = sorted({f"{k.name} v{k.version}" for k in keys if files.count(k.file_name) > 1})
            raise InvalidKey(f"the release names {', '.join(twice)} twice; refusing it")
        installed: list[str] = []
        unchanged: list[str] = []
        removed: list[str] = []
        staging = Staging(self.root)
        with self._opened(create=True) as own_fd:
            assert own_fd is not None
            listing = self._scan(own_fd)
            if listing.foreign:
                raise KeystoreError(
                    f"{self.directory} holds {', '.join(listing.foreign)}, which keylease-agent "
                    f"did not write and container runtimes would try to parse: move it out of "
                    f"{self.directory} (that directory is managed by keylease-agent)"
                )
            try:
                self._remove(own_fd, listing.temps)
                for key in keys:
                    data, file = key.pem.reveal(), key.file_name
                    current = listing.keys.get(file)
                    if current is not None and self._same(own_fd, file, current, data):
                        unchanged.append(file)
                        continue
                    self._publish(own_fd, staging, file, data, replace=current is not None)
                    installed.append(file)
                with io_errors("sync", self.directory):
                    os.fsync(own_fd)
                removed = sorted(set(listing.keys) - wanted)
                self._remove(own_fd, removed)
            finally:
                staging.remove()
        return SyncResult(tuple(installed), tuple(unchanged), tuple(removed))

    def clear(self) -> list[str]:
        """Remove every key file this agent owns here; return the file names removed."""
        staging = Staging(self.root)
        with self._opened(create=False) as own_fd:
            try:
                if own_fd is None:
                    return []
                listing = self._scan(own_fd)
                removed = sorted(listing.keys)
                self._remove(own_fd, [*listing.temps, *removed])
                if listing.foreign:
                    log.warning(
                        "%s holds entries keylease-agent did not write: %s",
                        self.directory,
                        ", ".join(listing.foreign),
                    )
                return removed
            finally:
                staging.remove()

    def installed(self) -> list[str]:
        """The key files currently installed here (``<name>.v<version>.pem``)."""
        with self._opened(create=False) as own_fd:
            return [] if own_fd is None else sorted(self._scan(own_fd).keys)

    # -- internals --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _opened(self, create: bool) -> Iterator[int | None]:
        """An fd on ``keylease/`` (created if asked), or None if it doesn't exist."""
        root_fd = self._open_root(create)
        if root_fd is None:
            yield None
            return
        try:
            own_fd = self._open_own(root_fd, create)
            try:
                yield own_fd
            finally:
                if own_fd is not None:
                    os.close(own_fd)
        finally:
            os.close(root_fd)

    def _open_root(self, create: bool) -> int | None:
        created = False
        with io_errors("create", self.root):
            if create:
                try:
                    os.mkdir(self.root, 0o755)
                    created = True
                except FileExistsError:
                    pass
                except FileNotFoundError:
                    os.makedirs(self.root.parent, 0o755, exist_ok=True)
                    os.mkdir(self.root, 0o755)
                    created = True
        with io_errors("open", self.root):
            try:
                fd = open_dir(self.root, str(self.root), None)
            except FileNotFoundError:
                if create:
                    raise
                return None
            if created:
                os.fchmod(fd, 0o755)  # runtimes must be able to walk it, whatever the umask
        return fd

    def _open_own(self, root_fd: int, create: bool) -> int | None:
        with io_errors("create", self.directory):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(OWNED_DIR, 0o700, dir_fd=root_fd)
            try:
                fd = open_dir(self.directory, OWNED_DIR, root_fd)
            except FileNotFoundError:
                if create:
                    raise
                return None
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
                    os.fchmod(fd, 0o700)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _scan(self, own_fd: int) -> _Listing:
        keys: dict[str, os.stat_result] = {}
        temps: list[str] = []
        foreign: list[str] = []
        with io_errors("list", self.directory):
            for entry in sorted(os.listdir(own_fd)):
                try:
                    st = os.stat(entry, dir_fd=own_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode) and parse_key_file(entry) is not None:
                    keys[entry] = st
                elif stat.S_ISREG(st.st_mode) and TEMP_FILE.fullmatch(entry):
                    temps.append(entry)
                else:
                    foreign.append(f"{entry} ({kind(st.st_mode)})")
        return _Listing(keys, tuple(temps), tuple(foreign))

    def _same(self, own_fd: int, file: str, current: os.stat_result, data: bytes) -> bool:
        """True if ``file`` already holds exactly ``data`` with mode 0600."""
        if stat.S_IMODE(current.st_mode) != 0o600 or current.st_size != len(data):
            return False
        with io_errors("read", self.directory / file):
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=own_fd)
            try:
                content = b""
                while len(content) <= len(data) and (chunk := os.read(fd, 1 << 16)):
                    content += chunk
            finally:
                os.close(fd)
        return hmac.compare_digest(content, data)

    def _publish(
        self, own_fd: int, staging: Staging, final: str, data: bytes, *, replace: bool
    ) -> None:
        path = self.directory / final
        fd = self._open_tmpfile(own_fd) if self._o_tmpfile else None
        if fd is None:
            staging.publish(own_fd, self.directory, final, data)
            return
        with io_errors("write", path):
            try:
                os.fchmod(fd, 0o600)
                write_all(fd, data)
                os.fsync(fd)
                source = f"/proc/self/fd/{fd}"
                if not replace:
                    try:
                        os.link(source, final, dst_dir_fd=own_fd, follow_symlinks=True)
                        return
                    except FileExistsError:
                        pass  # appeared since the scan: replace it instead
                temp = temp_name(final)
                os.link(source, temp, dst_dir_fd=own_fd, follow_symlinks=True)
                try:
                    os.rename(temp, final, src_dir_fd=own_fd, dst_dir_fd=own_fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temp, dir_fd=own_fd)
                    raise
            finally:
                os.close(fd)

    def _open_tmpfile(self, own_fd: int) -> int | None:
        """An unnamed 0600 file in ``keylease/``, or None if the filesystem has no O_TMPFILE."""
        assert _O_TMPFILE is not None
        with io_errors("create a file in", self.directory):
            try:
                return os.open(".", _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=own_fd)
            except OSError as exc:
                if exc.errno not in _NO_TMPFILE:
                    raise
        log.debug("%s: no O_TMPFILE support, using %s", self.directory, Staging(self.root).path)
        self._o_tmpfile = False
        return None

    def _remove(self, own_fd: int, entries: Sequence[str]) -> None:
        if not entries:
            return
        for entry in entries:
            with (
                io_errors("remove", self.directory / entry),
                contextlib.suppress(FileNotFoundError),
            ):
                os.unlink(entry, dir_fd=own_fd)
        with io_errors("sync", self.directory):
            os.fsync(own_fd)

"""The agent's state directory: its files, written atomically, and the AK, the enrollment record
and the enrollment challenge.

Nothing here is secret in the clear: the AK private blob is wrapped by the TPM, the challenge
(``credential.bin``) opens only in this TPM, and the release cache (``agent.keystore.cache``)
opens only in this TPM in the attested PCR state (and is signed by the broker). Files are still
0600 in a 0700 directory, written atomically: a temp file in the same directory created
exclusively and without following links (``O_CREAT | O_EXCL | O_NOFOLLOW``: a file, hardlink or
symlink planted at its name is removed, never written through), fsync, rename, fsync the
directory. Files are read without following a symlink. Each file's module owns its encoding:
the AK blobs, the enrollment record and the challenge here, ``status.json`` in ``agent.status``,
the sealed cache in ``agent.keystore.cache``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.blobs import AkBlobs, Credential
from agent.errors import StateError
from keylease.api.v1.limits import MAX_RELEASE_MESSAGE

__all__ = ["Enrollment", "StateDir"]

AK_PUBLIC = "ak.pub"
AK_PRIVATE = "ak.priv"
ENROLLMENT = "enrollment.json"
CREDENTIAL = "credential.bin"
log = logging.getLogger(__name__)

MAX_FILE = MAX_RELEASE_MESSAGE  # the largest file here is a release, as the broker sent it


@dataclass(frozen=True)
class Enrollment:
    node_name: str
    kbs: str
    state: str


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, path: Path) -> StateDir:
        """Create (0700) or check the directory; refuse a symlink or a group/world-writable one."""
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(path)
        except OSError as exc:
            raise StateError(f"state directory {path}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise StateError(f"state directory {path} is not a directory (or is a symlink)")
        if st.st_mode & 0o022:
            raise StateError(
                f"state directory {path} is writable by group or others; run: chmod 700 {path}"
            )
        return cls(path)

    # --- files ------------------------------------------------------------------------------

    def read(self, name: str) -> bytes | None:
        """The file's content, or None if it does not exist. Raises StateError."""
        try:
            fd = os.open(self.path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path / name}: {exc.strerror}") from None
        if len(data) > MAX_FILE:
            raise StateError(f"{self.path / name} is larger than {MAX_FILE} bytes; remove it")
        return data

    def write(self, name: str, data: bytes) -> None:
        """Replace the file atomically with ``data`` (0600). Raises StateError."""
        final = self.path / name
        tmp = self.path / f".{name}.tmp"
        try:
            fd = self._create(tmp)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):  # e.g. a read-only file system: nothing to undo
                tmp.unlink(missing_ok=True)
            raise StateError(f"cannot write {final}: {exc.strerror}") from None

    def _create(self, tmp: Path) -> int:
        """A new, empty temp file; whatever sits at its name (a leftover, or a planted file,
        hardlink or symlink) is unlinked first, never opened."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(tmp, flags, 0o600)
        except FileExistsError:
            log.warning("%s already existed (left over or planted); removed it unread", tmp)
            tmp.unlink()
            return os.open(tmp, flags, 0o600)

    def remove(self, name: str) -> None:
        """Remove the file if it exists. Raises StateError."""
        try:
            (self.path / name).unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot remove {self.path / name}: {exc.strerror}") from None

    # --- AK ---------------------------------------------------------------------------------

    def load_ak(self) -> AkBlobs | None:
        public, private = self.read(AK_PUBLIC), self.read(AK_PRIVATE)
        if public is None or private is None:
            return None
        return AkBlobs(public=public, private=private)

    def save_ak(self, ak: AkBlobs) -> None:
        self.write(AK_PRIVATE, ak.private)
        self.write(AK_PUBLIC, ak.public)
        self.forget_enrollment()

    # --- enrollment record ------------------------------------------------------------------

    def load_enrollment(self) -> Enrollment | None:
        data = self.read(ENROLLMENT)
        if data is None:
            return None
        try:
            raw = json.loads(data)
            return Enrollment(node_name=raw["node_name"], kbs=raw["kbs"], state=raw["state"])
        except (ValueError, KeyError, TypeError):
            # A damaged record only costs a re-enrollment (same EK, same AK): drop it.
            self.remove(ENROLLMENT)
            return None

    def save_enrollment(self, enrollment: Enrollment) -> None:
        record = {
            "node_name": enrollment.node_name,
            "kbs": enrollment.kbs,
            "state": enrollment.state,
        }
        self.write(ENROLLMENT, json.dumps(record, sort_keys=True).encode())

    def forget_enrollment(self) -> None:
        self.remove(ENROLLMENT)
        self.remove(CREDENTIAL)

    # --- the enrollment challenge (``credential.bin``) -----------------------------------

    def load_credential(self) -> Credential | None:
        """The challenge kept at enrollment, or None (none, or not exactly two TPM2B values)."""
        data = self.read(CREDENTIAL)
        if data is None:
            return None
        first = _tpm2b(data)
        second = _tpm2b(data[len(first) :]) if first else b""
        if not first or not second or len(first) + len(second) != len(data):
            return None
        return Credential(credential_blob=first, encrypted_secret=second)

    def save_credential(self, credential: Credential) -> None:
        """Keep the challenge: TPM2B_ID_OBJECT || TPM2B_ENCRYPTED_SECRET, as marshalled."""
        if not _tpm2b(credential.credential_blob) or not _tpm2b(credential.encrypted_secret):
            raise StateError("the enrollment challenge is not two marshalled TPM2B values")
        self.write(CREDENTIAL, credential.credential_blob + credential.encrypted_secret)


def _tpm2b(data: bytes) -> bytes:
    """The marshalled TPM2B at the start of ``data`` (size prefix included), or b"" if none."""
    if len(data) < 2:
        return b""
    end = 2 + int.from_bytes(data[:2], "big")
    return data[:end] if end <= len(data) else b""

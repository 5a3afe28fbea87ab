"""The agent's state directory: AK blobs, enrollment record, sealed release cache.

Nothing here is secret in the clear: the AK private blob is wrapped by the TPM, and the release
cache opens only in this TPM in the attested PCR state. Files are still 0600 in a 0700 directory,
written atomically (temp file in the same directory, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.errors import StateError
from agent.tpm import AkBlobs

__all__ = ["Enrollment", "StateDir"]

AK_PUBLIC = "ak.pub"
AK_PRIVATE = "ak.priv"
ENROLLMENT = "enrollment.json"
RELEASE = "release.bin"
STATUS = "status.json"
RELEASE_PCRS = "release-pcrs.json"
MAX_FILE = 4 << 20


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

    def _read(self, name: str) -> bytes | None:
        try:
            with open(self.path / name, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path / name}: {exc.strerror}") from None
        if len(data) > MAX_FILE:
            raise StateError(f"{self.path / name} is larger than {MAX_FILE} bytes; remove it")
        return data

    def _write(self, name: str, data: bytes) -> None:
        final = self.path / name
        tmp = self.path / f".{name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
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
            tmp.unlink(missing_ok=True)
            raise StateError(f"cannot write {final}: {exc.strerror}") from None

    def _remove(self, name: str) -> None:
        try:
            (self.path / name).unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot remove {self.path / name}: {exc.strerror}") from None

    # --- AK ---------------------------------------------------------------------------------

    def load_ak(self) -> AkBlobs | None:
        public, private = self._read(AK_PUBLIC), self._read(AK_PRIVATE)
        if public is None or private is None:
            return None
        return AkBlobs(public=public, private=private)

    def save_ak(self, ak: AkBlobs) -> None:
        self._write(AK_PRIVATE, ak.private)
        self._write(AK_PUBLIC, ak.public)
        self._remove(ENROLLMENT)

    # --- enrollment record ------------------------------------------------------------------

    def load_enrollment(self) -> Enrollment | None:
        data = self._read(ENROLLMENT)
        if data is None:
            return None
        try:
            raw = json.loads(data)
            return Enrollment(node_name=raw["node_name"], kbs=raw["kbs"], state=raw["state"])
        except (ValueError, KeyError, TypeError):
            # A damaged record only costs a re-enrollment (same EK, same AK): drop it.
            self._remove(ENROLLMENT)
            return None

    def save_enrollment(self, enrollment: Enrollment) -> None:
        record = {
            "node_name": enrollment.node_name,
            "kbs": enrollment.kbs,
            "state": enrollment.state,
        }
        self._write(ENROLLMENT, json.dumps(record, sort_keys=True).encode())

    def forget_enrollment(self) -> None:
        self._remove(ENROLLMENT)

    # --- sealed release cache ---------------------------------------------------------------

    def load_release(self) -> bytes | None:
        return self._read(RELEASE)

    def save_release(self, blob: bytes, pcr_bank: str, pcrs: Mapping[int, bytes]) -> None:
        """The release, and the PCR values it was sealed to (public: they are in every quote),
        so that a cache that no longer opens can say which PCR changed."""
        record = {"bank": pcr_bank, "pcrs": {str(i): v.hex() for i, v in sorted(pcrs.items())}}
        self._write(RELEASE_PCRS, json.dumps(record, sort_keys=True).encode())
        self._write(RELEASE, blob)

    def load_release_pcrs(self) -> tuple[str, dict[int, bytes]] | None:
        data = self._read(RELEASE_PCRS)
        if data is None:
            return None
        try:
            raw = json.loads(data)
            return str(raw["bank"]), {int(i): bytes.fromhex(v) for i, v in raw["pcrs"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def drop_release(self) -> None:
        self._remove(RELEASE)
        self._remove(RELEASE_PCRS)

    # --- daemon status (read by `keylease-agent status`) -------------------------------------

    def load_status(self) -> bytes | None:
        return self._read(STATUS)

    def save_status(self, data: bytes) -> None:
        self._write(STATUS, data)

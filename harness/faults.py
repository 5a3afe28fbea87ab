"""Fault injection for the reliability tests (tests/system/test_faults.py), each fault real:

- ``private_tmpfs``: a process runs in a mount namespace of its own where some directories are
  small tmpfs mounts (gone with the process); ``fill``/``unfill`` fill one up from outside and
  ``remount`` turns it read-only and back (``nsenter`` into that namespace);
- ``kill_at``: SIGKILL at an exact system call (the Nth ``linkat``, the Nth ``rename`` of one
  path), injected by strace;
- ``JumpingClock``: a process whose wall clock (CLOCK_REALTIME) jumps while CLOCK_MONOTONIC
  runs on, as a clock step does (``harness/wallclock.c``, LD_PRELOADed).

No pytest imports.
"""

from __future__ import annotations

import shlex
import struct
import subprocess
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "JumpingClock",
    "fill",
    "in_namespace",
    "kill_at",
    "private_tmpfs",
    "remount",
    "seen_by",
    "unfill",
]

FILLER = ".filler"


def private_tmpfs(mounts: Mapping[Path, str], then: str = "") -> list[str]:
    """A command prefix: a new mount namespace where each path is a fresh tmpfs mounted with the
    given options (e.g. ``"size=8k,mode=0700"``); ``then`` is a shell line run after mounting
    (e.g. copying a database in), before the command."""
    lines = [f"mount -t tmpfs -o {shlex.quote(o)} keylease-fault {shlex.quote(str(p))}"
             for p, o in mounts.items()]  # fmt: skip
    script = "; ".join([*lines, *([then] if then else []), 'exec "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "sh"]


def in_namespace(pid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the mount namespace of process ``pid``."""
    return subprocess.run(
        ["nsenter", "--target", str(pid), "--mount", "--", *argv],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def fill(pid: int, directory: Path) -> None:
    """Fill the file system of ``directory`` (in ``pid``'s namespace) to the last block."""
    target = shlex.quote(str(directory / FILLER))
    in_namespace(pid, "sh", "-c", f"dd if=/dev/zero of={target} bs=4096 2>/dev/null; sync")


def unfill(pid: int, directory: Path) -> None:
    in_namespace(pid, "rm", "-f", str(directory / FILLER))


def remount(pid: int, mountpoint: Path, options: str) -> None:
    """``mount -o remount,OPTIONS`` (e.g. ``ro``, ``rw``) in ``pid``'s namespace."""
    done = in_namespace(pid, "mount", "-o", f"remount,{options}", str(mountpoint))
    if done.returncode != 0:
        raise RuntimeError(f"remount {mountpoint} {options}: {done.stderr}")


def seen_by(pid: int, path: Path) -> Path:
    """``path`` as process ``pid`` sees it (through its mount namespace)."""
    return Path(f"/proc/{pid}/root") / path.relative_to("/")


def kill_at(syscall: str, nth: int, path: Path | None = None) -> list[str]:
    """A command prefix: strace kills the command (SIGKILL) when it enters ``syscall`` for the
    ``nth`` time, counting only calls on ``path`` if given (every thread is followed)."""
    only = ["-P", str(path)] if path is not None else []
    return ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}", *only,
            "-e", f"inject={syscall}:signal=SIGKILL:when={nth}"]  # fmt: skip


class JumpingClock:
    """The wall clock of the processes given ``env``: ``jump(seconds)`` moves it, from outside,
    while they run (the shim maps the offset file shared and reads it at every clock call)."""

    SOURCE = Path(__file__).with_name("wallclock.c")

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.library = directory / "wallclock.so"
        self.offset_file = directory / "wallclock-offset"
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(self.library), str(self.SOURCE), "-ldl"],
            check=True, capture_output=True,
        )  # fmt: skip
        self.offset = 0
        self.offset_file.write_bytes(struct.pack("<q", 0))

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.library), "KEYLEASE_WALLCLOCK_FILE": str(self.offset_file)}

    def jump(self, seconds: int) -> None:
        """Move the wall clock by ``seconds`` (negative: back) from where it is now."""
        self.offset += seconds
        with open(self.offset_file, "r+b") as f:
            f.write(struct.pack("<q", self.offset))

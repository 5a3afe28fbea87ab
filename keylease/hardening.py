"""What a process holding key material does to itself at start: no core dumps, no ptrace by the
same user, and no swapping where the platform allows it.

- ``prctl(PR_SET_DUMPABLE, 0)``: no core file is written for this process whatever the host's
  core pattern says (the units also set ``LimitCORE=0``), and another process of the same user
  can neither ptrace it nor read its memory through ``/proc/PID/mem``.
- ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)``: every page the process touches stays in
  RAM, so key material in its heap never reaches swap. Only when the process may lock without
  bound (``RLIMIT_MEMLOCK`` unlimited — ``LimitMEMLOCK=infinity`` in the units — or
  CAP_IPC_LOCK): with a finite limit, ``MCL_FUTURE`` would make allocations fail once the limit
  is reached. Otherwise a warning says what is not covered. ``MCL_ONFAULT`` locks pages as they
  are touched rather than populating every mapping (thread stacks would otherwise cost their
  full reserved size in RAM).

Not covered: the key files on tmpfs (tmpfs pages may be swapped out on kernels without the tmpfs
``noswap`` option, e.g. Debian 12's 6.1: use encrypted swap or none on nodes) and copies the
container runtimes make.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
from dataclasses import dataclass

__all__ = ["Hardening", "harden_process"]

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
CAP_IPC_LOCK = 14


@dataclass(frozen=True)
class Hardening:
    non_dumpable: bool
    memory_locked: bool
    note: str  # what is not covered, or ""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError):
        pass
    return False


def harden_process(program: str) -> Hardening:
    """Make this process non-dumpable and lock its memory when allowed; logs what it did (one
    DEBUG line, or a WARNING naming what is not covered)."""
    libc = _libc()
    non_dumpable = libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    if not non_dumpable:
        log.warning(
            "%s: prctl(PR_SET_DUMPABLE, 0) failed (%s): a core dump could hold key material",
            program,
            os.strerror(ctypes.get_errno()),
        )
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    note = ""
    locked = False
    if soft == resource.RLIM_INFINITY or _has_cap_ipc_lock():
        locked = libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0
        if not locked:
            note = f"mlockall failed ({os.strerror(ctypes.get_errno())})"
    else:
        note = f"RLIMIT_MEMLOCK is {soft} bytes, not unlimited (set LimitMEMLOCK=infinity)"
    if note:
        log.warning(
            "%s: memory not locked: %s; key material in this process's memory may be swapped out",
            program,
            note,
        )
    else:
        log.debug("%s: core dumps off, memory locked (not swapped)", program)
    return Hardening(non_dumpable=non_dumpable, memory_locked=locked, note=note)

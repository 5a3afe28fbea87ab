"""One guest of the VM acceptance test: qemu (TCG) with OVMF booting Debian's kernel directly
(measured into PCR 4), root on NVMe from a qcow2 overlay of the cached image, an swtpm TPM 2.0
(tpm-crb), user networking restricted to the broker (guestfwd to 127.0.0.1:PORT through ``nc``)
and a control channel (guestfwd to ``cat`` of a command file). The guest's probe reports
``KLVM {json}`` lines on the serial console, kept in ``serial-<n>.log``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tests.system.vm.image import GUEST_KBS, GuestImage

__all__ = ["BASE_CMDLINE", "Machine", "ProbeState"]

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BASE_CMDLINE = "root=/dev/nvme0n1 rw console=ttyS0 quiet systemd.show_status=0"
# TCG: /dev/kvm on the machines this runs on is PVM, where a stock kernel hangs (notes/vm.md).
# KEYLEASE_VM_ACCEL=kvm where KVM is real. tb-size=128 keeps qemu at ~400 MiB instead of ~750.
ACCEL = "tcg,tb-size=128"
MARKER = re.compile(r"KLVM (\{.*\})")
EVENT_LOG_MARKER = re.compile(r"KLEV ([A-Za-z0-9+/=]+)")

ProbeState = dict[str, Any]


class Machine:
    """The worker VM; its TPM state, disk overlay and logs live in ``directory``."""

    def __init__(self, directory: Path, image: GuestImage, seed: Path, broker_port: int) -> None:
        self.directory = directory
        self.image = image
        self.seed = seed
        self.broker_port = broker_port
        self.tpm_state = directory / "tpm"
        self.disk = directory / "root.qcow2"
        self.command_file = directory / "command"
        self.boots = 0
        self.serial = directory / "serial-0.log"
        self._qemu: subprocess.Popen[bytes] | None = None
        self._swtpm: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(image.ext4),
                str(self.disk),
            ],
            check=True,
        )

    def boot(self, cmdline: str = BASE_CMDLINE) -> None:
        self.boots += 1
        self.serial = self.directory / f"serial-{self.boots}.log"
        self.command_file.write_text("")
        sock = self.tpm_state / "swtpm.sock"
        sock.unlink(missing_ok=True)
        self._log = open(self.directory / "qemu.log", "ab")  # noqa: SIM115 (closed in wait_off)
        self._swtpm = subprocess.Popen(
            [
                *("swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_state}"),
                *("--ctrl", f"type=unixio,path={sock}", "--terminate"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("swtpm did not create its control socket in 10 s")
            time.sleep(0.01)
        # A fresh copy of the variable store each boot: the firmware's PCRs repeat exactly.
        vars_fd = self.directory / "OVMF_VARS.fd"
        shutil.copy(OVMF_VARS, vars_fd)
        net = (
            "user,id=n0,restrict=on,"
            f"guestfwd=tcp:10.0.2.100:{GUEST_KBS}-cmd:nc 127.0.0.1 {self.broker_port},"
            f"guestfwd=tcp:10.0.2.101:7-cmd:cat {self.command_file}"
        )
        argv = [
            "qemu-system-x86_64",
            "-nodefaults",
            "-machine",
            "q35",
            "-accel",
            os.environ.get("KEYLEASE_VM_ACCEL", ACCEL),
            "-smp",
            "2",
            "-m",
            "768",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{self.serial}",
            "-drive",
            f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,file={vars_fd}",
            "-kernel",
            str(self.image.kernel),
            "-append",
            cmdline,
            "-drive",
            f"if=none,id=root,format=qcow2,file={self.disk}",
            "-device",
            "nvme,drive=root,serial=klroot",
            "-drive",
            f"if=none,id=seed,format=raw,file={self.seed}",
            "-device",
            "nvme,drive=seed,serial=klseed",
            "-netdev",
            net,
            "-device",
            "virtio-net-pci,netdev=n0",
            "-chardev",
            f"socket,id=chrtpm,path={sock}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-crb,tpmdev=tpm0",
        ]
        self._qemu = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )

    def states(self) -> list[ProbeState]:
        """Every probe report of the current boot, oldest first."""
        if not self.serial.exists():
            return []
        found: list[ProbeState] = []
        for match in MARKER.finditer(self.serial.read_text(errors="replace")):
            try:
                found.append(json.loads(match.group(1)))
            except json.JSONDecodeError:
                continue  # a console message cut into the line; the next report repeats it
        return found

    def event_log(self, timeout: float = 120) -> bytes:
        """The boot event log the guest's probe printed (``KLEV``) during the current boot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.serial.read_text(errors="replace") if self.serial.exists() else ""
            found = EVENT_LOG_MARKER.search(text)
            if found:
                return base64.b64decode(found.group(1))
            time.sleep(0.5)
        raise AssertionError(f"no event log on the serial console within {timeout:.0f} s")

    def wait_for(
        self,
        what: str,
        check: Callable[[ProbeState], bool],
        timeout: float = 180,
        skip: int = 0,
    ) -> ProbeState:
        """The first report of this boot (after the first ``skip``) that passes ``check``."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            for state in states[skip:]:
                if check(state):
                    return state
            if self._qemu is not None and self._qemu.poll() is not None:
                raise AssertionError(f"the VM stopped while waiting for {what}; see {self.serial}")
            if time.monotonic() > deadline:
                last = json.dumps(states[-1], indent=1) if states else "no probe report"
                raise AssertionError(f"timed out waiting for {what}; last report: {last}")
            time.sleep(0.1)

    def poweroff(self, timeout: float = 60) -> None:
        self.command_file.write_text("poweroff\n")
        self.wait_off(timeout)

    def wait_off(self, timeout: float = 60) -> None:
        try:
            if self._qemu is not None:
                try:
                    self._qemu.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._qemu.kill()
                    self._qemu.wait()
                    raise AssertionError(f"the VM did not power off in {timeout} s") from None
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in (self._qemu, self._swtpm):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self._qemu = self._swtpm = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def disk_contains(self, needles: list[bytes]) -> list[bytes]:
        """Which ``needles`` occur anywhere on the guest's disk (overlay flattened to raw)."""
        raw = self.directory / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(self.disk), str(raw)], check=True)
        found: set[bytes] = set()
        overlap = max(len(n) for n in needles)
        tail = b""
        try:
            with open(raw, "rb") as f:
                while chunk := f.read(16 << 20):
                    data = tail + chunk
                    found.update(n for n in needles if n in data)
                    tail = data[-overlap:]
        finally:
            os.unlink(raw)
        return [n for n in needles if n in found]

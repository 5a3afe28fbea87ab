"""Capture real boot event logs from the project's OVMF VM, in three boot states, as test data.

    python -m tests.system.vm.capture tests/data/eventlogs      # needs root, qemu, OVMF

Boots the VM acceptance test's guest (tests/system/vm/image.py, machine.py) on an swtpm with the
sha256 bank only, with the base kernel command line and with ``CHANGED_CMDLINE`` (the Linux EFI
stub measures the command line, so PCR 9 and the log differ), then a second guest on an swtpm with
the sha1, sha256 and sha384 banks active (the firmware logs three digests per event). For each boot
it writes ``ovmf-<state>.bin`` (the firmware's TCG PC Client crypto-agile log as the guest's
securityfs shows it) and ``ovmf-<state>.json``: the kernel command line and the PCR values of that
boot per bank, as the broker recorded them from the agent's verified quote of that boot (a record
whose TPM resetCount is new: so log and PCRs belong together).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from harness.broker import Broker
from harness.swtpm import SwtpmCa, provision
from tests.system.vm.image import GuestImage, build_image
from tests.system.vm.machine import BASE_CMDLINE, Machine
from tests.system.vm.scenario import CHANGED_CMDLINE, NODE, _image_key, _seed

__all__ = ["MACHINES", "capture"]

# (TPM banks, [(state, kernel command line), ...]) per guest
MACHINES: tuple[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], ...] = (
    (("sha256",), (("base", BASE_CMDLINE), ("cmdline", CHANGED_CMDLINE))),
    (("sha1", "sha256", "sha384"), (("multibank", BASE_CMDLINE),)),
)


def _attested(broker: Broker, reset_counts: set[int], timeout: float = 300) -> dict[str, object]:
    """The node's record once it holds an attestation from a boot not in ``reset_counts``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = broker.kbs("node", "show", NODE, "--json")
        if shown.returncode == 0:
            record = json.loads(shown.stdout)
            if record.get("last_attested_at") and record["reset_count"] not in reset_counts:
                return dict(record)
        time.sleep(1)
    raise AssertionError(f"the node did not attest within {timeout:.0f} s:\n{broker.log()[-3000:]}")


def _machine(
    work: Path, image: GuestImage, ca: SwtpmCa, banks: Sequence[str],
    states: Sequence[tuple[str, str]], out: Path,
) -> list[Path]:  # fmt: skip
    work.mkdir()
    (work / "ek-roots.pem").write_bytes(ca.bundle_pem())
    broker = Broker(work / "kbs", work / "ek-roots.pem")
    broker.start()
    _private, public, _needles = _image_key(work)
    (work / "vm").mkdir()
    vm = Machine(
        work / "vm", image, _seed(work, broker, public), int(broker.address.rsplit(":")[1])
    )
    vm.tpm_state.mkdir()
    provision(vm.tpm_state, ca, banks)
    written: list[Path] = []
    seen: set[int] = set()
    try:
        for state, cmdline in states:
            vm.boot(cmdline)
            log = vm.event_log()
            record = _attested(broker, seen)
            seen.add(int(str(record["reset_count"])))
            vm.poweroff()
            (out / f"ovmf-{state}.bin").write_bytes(log)
            meta = {
                "cmdline": cmdline,
                "banks": list(banks),
                "pcrs": record["pcrs"],
                "captured_by": "python -m tests.system.vm.capture " + str(out),
            }
            (out / f"ovmf-{state}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            written += [out / f"ovmf-{state}.bin", out / f"ovmf-{state}.json"]
    finally:
        vm.kill()
        broker.stop()
    return written


def capture(out: Path, work: Path) -> list[Path]:
    image = build_image()
    ca = SwtpmCa(work / "ca")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for n, (banks, states) in enumerate(MACHINES):
        written += _machine(work / f"machine-{n}", image, ca, banks, states, out)
    return written


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests/data/eventlogs")
    with tempfile.TemporaryDirectory(prefix="kl-capture-") as tmp:
        for path in capture(out, Path(tmp)):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

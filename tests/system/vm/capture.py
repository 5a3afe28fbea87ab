"""Capture real boot event logs from the project's OVMF VM, in two boot states, as test data.

    python -m tests.system.vm.capture tests/data/eventlogs      # needs root, qemu, OVMF

Boots the VM acceptance test's guest (tests/system/vm/image.py, machine.py) twice on one swtpm:
with the base kernel command line and with ``CHANGED_CMDLINE`` (the Linux EFI stub measures the
command line, so PCR 9 and the log differ). For each boot it writes ``ovmf-<state>.bin`` (the
firmware's TCG PC Client crypto-agile log as the guest's securityfs shows it) and
``ovmf-<state>.json``: the kernel command line and the sha256 PCR values of that boot, as the
broker recorded them from the agent's verified quote (so log and PCRs belong together).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from harness.broker import Broker
from harness.swtpm import SwtpmCa, provision
from tests.system.vm.image import build_image
from tests.system.vm.machine import BASE_CMDLINE, Machine
from tests.system.vm.scenario import CHANGED_CMDLINE, NODE, _image_key, _seed

__all__ = ["STATES", "capture"]

STATES = {"base": BASE_CMDLINE, "cmdline": CHANGED_CMDLINE}


def _attested_pcrs(broker: Broker, after: str | None, timeout: float = 300) -> dict[str, object]:
    """The node's record once it holds an attestation newer than ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = broker.kbs("node", "show", NODE, "--json")
        if shown.returncode == 0:
            record = json.loads(shown.stdout)
            if record.get("last_attested_at") and record["last_attested_at"] != after:
                return dict(record)
        time.sleep(1)
    raise AssertionError(f"the node did not attest within {timeout:.0f} s:\n{broker.log()[-3000:]}")


def capture(out: Path, work: Path) -> list[Path]:
    image = build_image()
    ca = SwtpmCa(work / "ca")
    (work / "ek-roots.pem").write_bytes(ca.bundle_pem())
    broker = Broker(work / "kbs", work / "ek-roots.pem")
    broker.start()
    _private, public, _needles = _image_key(work)
    (work / "vm").mkdir()
    vm = Machine(
        work / "vm", image, _seed(work, broker, public), int(broker.address.rsplit(":")[1])
    )
    vm.tpm_state.mkdir()
    provision(vm.tpm_state, ca)
    written: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    last: str | None = None
    try:
        for state, cmdline in STATES.items():
            vm.boot(cmdline)
            log = vm.event_log()
            record = _attested_pcrs(broker, last)
            last = str(record["last_attested_at"])
            vm.poweroff()
            (out / f"ovmf-{state}.bin").write_bytes(log)
            meta = {
                "cmdline": cmdline,
                "pcr_bank": record["pcr_bank"],
                "pcrs": record["pcrs"],
                "captured_by": "python -m tests.system.vm.capture " + str(out),
            }
            (out / f"ovmf-{state}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            written += [out / f"ovmf-{state}.bin", out / f"ovmf-{state}.json"]
    finally:
        vm.kill()
        broker.stop()
    return written


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests/data/eventlogs")
    with tempfile.TemporaryDirectory(prefix="kl-capture-") as tmp:
        for path in capture(out, Path(tmp)):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

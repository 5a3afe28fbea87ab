"""Issue 5's acceptance test: keylease on a booting Debian 12 VM (qemu TCG, OVMF measured boot,
swtpm TPM 2.0 with an EK certificate from a test CA), the agent as its systemd unit, the broker
on this host. The scenario itself is tests/system/vm/scenario.py (also `make vm-test`).

Marked ``vm``: it builds a cached guest image (needs root and, once, Debian's archive) and boots
node A four times and canary B once; `pytest -m "not vm"` leaves it out.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.vm.scenario import run_scenario

pytestmark = pytest.mark.vm


def test_vm_acceptance(tmp_path: Path) -> None:
    lines: list[str] = []
    results = run_scenario(tmp_path, lines)
    report = "\n".join(lines)
    assert [r.step[0] for r in results] == ["1", "2", "3", "4", "5", "6"], report
    assert all(r.ok for r in results), report

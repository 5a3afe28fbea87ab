"""The VM acceptance scenario (issue 5): a Debian 12 guest with systemd, the agent installed from
wheels as a systemd unit, an swtpm TPM 2.0 with an EK certificate from a test CA, OVMF measuring
the boot; the broker runs on this host and the guest reaches only it. Every step is asserted from
outside the guest (the probe's serial-console reports, the guest's disk, the broker's audit log).

    python -m tests.system.vm.scenario [WORKDIR]      # or: make vm-test

Prints one line per step and the total wall time; the serial logs stay in WORKDIR.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.broker import Broker
from harness.oci import make_oci_image, skopeo_encrypt
from harness.swtpm import SwtpmCa, provision
from tests.system.vm.image import GUEST_KBS, build_image
from tests.system.vm.machine import BASE_CMDLINE, Machine, ProbeState

__all__ = ["NODE", "StepResult", "run_scenario"]

NODE = "kl-worker"
KEY = "vm-key"
KEY_FILE = f"{KEY}.v1.pem"
SECRET = b"keylease VM acceptance secret\n"
CHANGED_CMDLINE = BASE_CMDLINE + " keylease.vmtest=changed"
REVOKE_LIMIT = 5.0


@dataclass(frozen=True)
class StepResult:
    step: str
    ok: bool
    detail: str
    seconds: float

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.step} ({self.seconds:.1f} s): {self.detail}"


def _seed(work: Path, broker: Broker, public_key: Path) -> Path:
    seed = work / "seed"
    seed.mkdir()
    shutil.copy(broker.ca, seed / "agent-ca.pem")
    host = os.uname().nodename
    (seed / "hosts").write_text(f"10.0.2.100 {host}\n")
    (seed / "agent.toml").write_text(
        f'kbs = "{host}:{GUEST_KBS}"\n'
        'kbs_ca = "/etc/keylease/agent-ca.pem"\n'
        'tcti = "device:/dev/tpmrm0"\n'
        f'node_name = "{NODE}"\n'
        "retry_max_seconds = 5\n"
    )
    plain = work / "image-plain"
    make_oci_image(plain, "v1", {"secret.txt": SECRET})
    skopeo_encrypt(plain, "v1", seed / "image-enc", public_key)
    out = work / "seed.ext4"
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-L", "klseed", "-d", str(seed), str(out), "32M"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


def _image_key(work: Path) -> tuple[Path, Path, list[bytes]]:
    key = rsa.generate_private_key(65537, 3072)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private, public = work / "image-key.pem", work / "image-key.pub"
    private.write_bytes(pem)
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    # What a plaintext copy on disk would contain: DER slices of the private part, PEM lines.
    d_bytes = key.private_numbers().d.to_bytes(384, "big")
    needles = [d_bytes[:32], d_bytes[-32:], *pem.splitlines()[5:8]]
    return private, public, needles


def _kbs(broker: Broker, *args: str) -> str:
    result = broker.kbs(*args)
    if result.returncode != 0:
        raise AssertionError(f"keylease-kbs {' '.join(args)} failed: {result!r}")
    return result.stdout


def _wait_node(broker: Broker, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while NODE not in broker.kbs("node", "list").stdout:
        if time.monotonic() > deadline:
            raise AssertionError(f"the node never enrolled; broker log:\n{broker.log()[-3000:]}")
        time.sleep(0.5)


def _has_key(state: ProbeState) -> bool:
    return KEY_FILE in state["keys"] and state["agent"] == "active"


def _journal(state: ProbeState) -> str:
    return "\n".join(state["journal"])


def step1(vm: Machine, broker: Broker, private_key: Path) -> str:
    vm.boot()
    _wait_node(broker)
    _kbs(broker, "node", "approve", NODE, "--label", "role=vm")
    _kbs(broker, "policy", "learn", "vm-boot", "--from-node", NODE)  # from its boot event log
    _kbs(broker, "policy", "assign", "vm-boot", "--selector", "role=vm")
    _kbs(broker, "key", "import", KEY, "--private-key", str(private_key))
    _kbs(broker, "grant", "add", KEY, "--selector", "role=vm")
    state = vm.wait_for(
        "the key installed and decrypted",
        lambda s: _has_key(s) and KEY_FILE in s["decrypted"],
    )
    fs = state["keys"][KEY_FILE]["fs"]
    decrypted = state["decrypted"][KEY_FILE]
    assert fs == "tmpfs", f"the key is on {fs}, not tmpfs"
    assert decrypted == "ok: " + SECRET.decode().strip(), decrypted
    return f"agent {state['agent']}, {KEY_FILE} on {fs}, skopeo in the guest: {decrypted}"


def step2(vm: Machine, broker: Broker, needles: list[bytes]) -> str:
    broker.stop()
    vm.poweroff()
    vm.boot()
    state = vm.wait_for(
        "multi-user.target with the key", lambda s: _has_key(s) and s["multi_user"] > 0
    )
    restored_at, multi_user = state["keys"][KEY_FILE]["since_boot"], state["multi_user"]
    assert restored_at < multi_user, f"key at {restored_at} s, multi-user at {multi_user} s"
    assert "restored" in _journal(state), _journal(state)
    vm.poweroff()
    leaked = vm.disk_contains(needles)
    assert not leaked, f"key material found on the guest disk: {leaked!r}"
    return (
        f"restored at {restored_at:.1f} s, multi-user.target at {multi_user:.1f} s (broker down); "
        f"state dir {state['state_files']}, no key material on disk"
    )


def _denial(state: ProbeState) -> str:
    """The agent's journal line for a broker denial naming a component, or ""."""
    lines = [ln for ln in state["journal"] if "result=denied" in ln and COMPONENT in ln]
    return lines[-1] if lines else ""


COMPONENT = "kernel command line [kernel-cmdline]"


def step3(vm: Machine, broker: Broker) -> str:
    vm.boot(CHANGED_CMDLINE)
    state = vm.wait_for("the restore refused", lambda s: "nothing restored" in _journal(s))
    assert not state["keys"], f"keys present after a changed boot: {state['keys']}"
    restore = next(ln for ln in state["journal"] if "nothing restored" in ln)
    broker.restart()
    state = vm.wait_for("the broker's denial naming the component", lambda s: bool(_denial(s)))
    assert not state["keys"], state["keys"]
    named = re.search(r"PCR 8,9, kernel command line \[kernel-cmdline\] \([^)]*\): digest \S+ "
                      r"is not allowed by policy vm-boot", _denial(state))  # fmt: skip
    assert named is not None, _denial(state)
    audit = [
        ln for ln in _kbs(broker, "audit", "--node", NODE).splitlines() if "PolicyDenied" in ln
    ]
    assert audit, "no PolicyDenied in the broker's audit log"
    assert named.group(0) in audit[-1], audit
    assert named.group(0) in _kbs(broker, "node", "show", NODE)
    seen = len(vm.states())
    allowed = _kbs(broker, "policy", "allow", "vm-boot", "--from-node", NODE,
                   "--component", "kernel-cmdline")  # fmt: skip
    assert "+ kernel-cmdline: " in allowed, allowed
    vm.wait_for("the key back after `policy allow`", _has_key, timeout=120, skip=seen)
    vm.poweroff()
    return (
        f"cache refused offline ({restore.split(': ', 1)[1][:60]}...); broker denied naming "
        f"the component ({named.group(0)[:60]}...; agent journal, audit, node show); "
        "`policy allow --component kernel-cmdline` gave the key back"
    )


def step4(vm: Machine, broker: Broker) -> str:
    vm.boot()
    vm.wait_for("the key back", _has_key)
    seen = len(vm.states())
    start = time.monotonic()
    _kbs(broker, "node", "revoke", NODE)
    returned = time.monotonic()
    vm.wait_for("the key removed", lambda s: not s["keys"], timeout=60, skip=seen)
    took = time.monotonic() - returned
    assert took <= REVOKE_LIMIT, f"the key stayed {took:.1f} s after `node revoke` returned"
    vm.poweroff()
    return (
        f"key removed {took:.1f} s after `node revoke` returned "
        f"(the command itself took {returned - start:.1f} s)"
    )


def run_scenario(work: Path, out: list[str] | None = None) -> list[StepResult]:
    """Run steps 1-4; stop at the first failure. Lines go to ``out`` and stdout as they come."""
    lines = out if out is not None else []

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    started = time.monotonic()
    notes: list[str] = []
    image = build_image(notes)
    built = "; ".join(notes) or "cached"
    say(f"image: {image.ext4.name} ({built}) {time.monotonic() - started:.1f} s")
    ca = SwtpmCa(work / "ca")
    (work / "ek-roots.pem").write_bytes(ca.bundle_pem())
    broker = Broker(work / "kbs", work / "ek-roots.pem")
    broker.start()
    port = int(broker.address.rsplit(":", 1)[1])
    private, public, needles = _image_key(work)
    (work / "vm").mkdir()
    vm = Machine(work / "vm", image, _seed(work, broker, public), port)
    vm.tpm_state.mkdir()
    provision(vm.tpm_state, ca)
    results: list[StepResult] = []
    steps: list[tuple[str, Callable[[], str]]] = [
        ("1 first boot", lambda: step1(vm, broker, private)),
        ("2 reboot, broker down", lambda: step2(vm, broker, needles)),
        ("3 changed measured boot", lambda: step3(vm, broker)),
        ("4 revoke while running", lambda: step4(vm, broker)),
    ]
    try:
        for name, run in steps:
            t = time.monotonic()
            try:
                detail, ok = run(), True
            except AssertionError as exc:
                detail, ok = f"{exc} (serial log {vm.serial})", False
            result = StepResult(name, ok, detail, time.monotonic() - t)
            results.append(result)
            say(result.line())
            if not ok:
                break
    finally:
        vm.kill()
        broker.stop()
        say(f"total wall time {time.monotonic() - started:.1f} s; logs in {work}")
    return results


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="kl-vm-"))
    work.mkdir(parents=True, exist_ok=True)
    results = run_scenario(work)
    (work / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0 if len(results) == 4 and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The VM acceptance scenario (issues 5 and 11): Debian 12 guests with systemd, the agent installed
from wheels as a systemd unit, each guest with its own swtpm TPM 2.0 with an EK certificate from a
test CA, OVMF measuring the boot; the broker runs on this host and the guests reach only it. Node
A runs with its key, reboots with the broker down and restores it; canary B boots a new kernel
command line, is denied naming it, and is approved with `policy allow` (then revoked while it
runs); A, pushed the approvals, reboots into the new command line with the broker down and has
its key before multi-user.target, then boots a command line nothing approves and has none. Every
step is asserted from outside the guests (the probes' serial-console reports, A's disk, the
broker's audit log).

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
CANARY = "kl-canary"
KEY = "vm-key"
KEY_FILE = f"{KEY}.v1.pem"
SECRET = b"keylease VM acceptance secret\n"
CHANGED_CMDLINE = BASE_CMDLINE + " keylease.vmtest=changed"
UNAPPROVED_CMDLINE = BASE_CMDLINE + " keylease.vmtest=unapproved"
REVOKE_LIMIT = 5.0


@dataclass(frozen=True)
class StepResult:
    step: str
    ok: bool
    detail: str
    seconds: float

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.step} ({self.seconds:.1f} s): {self.detail}"


def _seed(work: Path, broker: Broker, public_key: Path, node: str = NODE) -> Path:
    seed = work / f"seed-{node}"
    seed.mkdir()
    shutil.copy(broker.ca, seed / "agent-ca.pem")
    host = os.uname().nodename
    (seed / "hosts").write_text(f"10.0.2.100 {host}\n")
    (seed / "agent.toml").write_text(
        f'kbs = "{host}:{GUEST_KBS}"\n'
        'kbs_ca = "/etc/keylease/agent-ca.pem"\n'
        'tcti = "device:/dev/tpmrm0"\n'
        f'node_name = "{node}"\n'
        "retry_max_seconds = 5\n"
    )
    plain = work / "image-plain"
    if not plain.exists():
        make_oci_image(plain, "v1", {"secret.txt": SECRET})
    skopeo_encrypt(plain, "v1", seed / "image-enc", public_key)
    out = work / f"seed-{node}.ext4"
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


def _wait_node(broker: Broker, node: str = NODE, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while node not in broker.kbs("node", "list").stdout:
        if time.monotonic() > deadline:
            raise AssertionError(f"the node never enrolled; broker log:\n{broker.log()[-3000:]}")
        time.sleep(0.5)


def _wait_broker_log(broker: Broker, text: str, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while broker.log().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the broker never logged {text!r} ({count}x)")
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


def _restored_before_multi_user(vm: Machine) -> ProbeState:
    state = vm.wait_for(
        "multi-user.target with the key", lambda s: _has_key(s) and s["multi_user"] > 0
    )
    restored_at, multi_user = state["keys"][KEY_FILE]["since_boot"], state["multi_user"]
    assert restored_at < multi_user, f"key at {restored_at} s, multi-user at {multi_user} s"
    assert "restored" in _journal(state), _journal(state)
    return state


def step2(vm: Machine, broker: Broker) -> str:
    broker.stop()
    vm.poweroff()
    vm.boot()
    state = _restored_before_multi_user(vm)
    return (
        f"restored at {state['keys'][KEY_FILE]['since_boot']:.1f} s, multi-user.target at "
        f"{state['multi_user']:.1f} s (broker down); state dir {state['state_files']}"
    )


def _denial(state: ProbeState) -> str:
    """The agent's journal line for a broker denial naming a component, or ""."""
    lines = [ln for ln in state["journal"] if "result=denied" in ln and COMPONENT in ln]
    return lines[-1] if lines else ""


COMPONENT = "kernel command line [kernel-cmdline]"
PUSHED = "kept approvals from the watch stream (policy vm-boot:"


def step3(a: Machine, b: Machine, broker: Broker) -> str:
    """A runs with its key; canary B boots the new command line, is denied naming it, and is
    approved with `policy allow`: B gets its key, A is pushed the approvals."""
    seen_a = len(a.states())
    watching = f"watch node={NODE} started"
    streams = broker.log().count(watching)
    broker.restart()
    a.wait_for("A attested again", lambda s: _has_key(s) and "attestation ok" in s["status"],
               skip=seen_a)  # fmt: skip
    _wait_broker_log(broker, watching, streams + 1)  # A's watch stream is back: it hears pushes
    b.boot(CHANGED_CMDLINE)
    _wait_node(broker, CANARY)
    _kbs(broker, "node", "approve", CANARY, "--label", "role=vm")
    state = b.wait_for("the broker's denial naming the component", lambda s: bool(_denial(s)))
    assert not state["keys"], state["keys"]
    named = re.search(r"PCR 8,9, kernel command line \[kernel-cmdline\] \([^)]*\): digest \S+ "
                      r"is not allowed by policy vm-boot", _denial(state))  # fmt: skip
    assert named is not None, _denial(state)
    audit = [
        ln for ln in _kbs(broker, "audit", "--node", CANARY).splitlines() if "PolicyDenied" in ln
    ]
    assert audit, "no PolicyDenied in the broker's audit log"
    assert named.group(0) in audit[-1], audit
    assert named.group(0) in _kbs(broker, "node", "show", CANARY)
    seen_a, seen_b = len(a.states()), len(b.states())
    allowed = _kbs(broker, "policy", "allow", "vm-boot", "--from-node", CANARY,
                   "--component", "kernel-cmdline")  # fmt: skip
    assert "+ kernel-cmdline: " in allowed, allowed
    b.wait_for("the canary's key after `policy allow`", _has_key, timeout=120, skip=seen_b)
    pushed = a.wait_for("A keeps the approvals pushed to it", lambda s: PUSHED in _journal(s),
                        timeout=60, skip=seen_a)  # fmt: skip
    line = next(ln for ln in pushed["journal"] if PUSHED in ln)
    assert f"canary {CANARY}" in line, line
    return (
        f"canary denied naming the component ({named.group(0)[:60]}...; agent journal, audit, "
        "node show); `policy allow --from-node kl-canary --component kernel-cmdline` gave it the "
        f"key, and A was pushed the approvals ({line[line.index('(') + 1 :][:70]}...)"
    )


def step4(vm: Machine, other: Machine, broker: Broker) -> str:
    """`node revoke` of the canary while it runs: its key is gone within 5 s (A is powered off
    first: two guests under TCG on two cores would measure the host, not the agent)."""
    other.poweroff()
    seen = len(vm.states())
    start = time.monotonic()
    _kbs(broker, "node", "revoke", CANARY)
    returned = time.monotonic()
    vm.wait_for("the key removed", lambda s: not s["keys"], timeout=60, skip=seen)
    took = time.monotonic() - returned
    assert took <= REVOKE_LIMIT, f"the key stayed {took:.1f} s after `node revoke` returned"
    vm.poweroff()
    return (
        f"key removed {took:.1f} s after `node revoke` returned "
        f"(the command itself took {returned - start:.1f} s)"
    )


def step5(vm: Machine, broker: Broker) -> str:
    """The broker down, A (powered off in step 4) boots the approved command line: its key
    before multi-user.target, from the cache, opened under the canary's approval."""
    broker.stop()
    vm.boot(CHANGED_CMDLINE)
    state = _restored_before_multi_user(vm)
    line = next(ln for ln in state["journal"] if "restored" in ln)
    assert "with approved state policy vm-boot: " in line, line
    assert f"canary {CANARY}" in line, line
    return (
        f"restored at {state['keys'][KEY_FILE]['since_boot']:.1f} s, multi-user.target at "
        f"{state['multi_user']:.1f} s (broker down), with the canary's approval"
    )


def step6(vm: Machine, needles: list[bytes]) -> str:
    """A boots a command line nothing approves: no key, the journal names the component."""
    vm.poweroff()
    vm.boot(UNAPPROVED_CMDLINE)
    state = vm.wait_for(
        "the restore refused", lambda s: "nothing restored" in _journal(s) and s["multi_user"] > 0
    )
    assert not state["keys"], f"keys present after an unapproved boot: {state['keys']}"
    line = next(ln for ln in state["journal"] if "nothing restored" in ln)
    named = re.search(r"no approved state matches this boot: PCR 8,9, kernel command line "
                      r"\[kernel-cmdline\] \([^)]*\): digest \S+ is not allowed by policy "
                      r"vm-boot", line)  # fmt: skip
    assert named is not None, line
    vm.poweroff()
    leaked = vm.disk_contains(needles)
    assert not leaked, f"key material found on the guest disk: {leaked!r}"
    return f"no key ({named.group(0)[:90]}...); no key material anywhere on A's disk"


def run_scenario(work: Path, out: list[str] | None = None) -> list[StepResult]:
    """Run steps 1-6; stop at the first failure. Lines go to ``out`` and stdout as they come."""
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
    machines = []
    for name, node in (("vm", NODE), ("vm-canary", CANARY)):
        (work / name).mkdir()
        machine = Machine(work / name, image, _seed(work, broker, public, node), port)
        machine.tpm_state.mkdir()
        provision(machine.tpm_state, ca)
        machines.append(machine)
    vm, canary = machines
    results: list[StepResult] = []
    steps: list[tuple[str, Callable[[], str]]] = [
        ("1 first boot", lambda: step1(vm, broker, private)),
        ("2 reboot, broker down", lambda: step2(vm, broker)),
        ("3 canary approved, A pushed the approvals", lambda: step3(vm, canary, broker)),
        ("4 revoke the canary while running", lambda: step4(canary, vm, broker)),
        ("5 A reboots into the approved update, broker down", lambda: step5(vm, broker)),
        ("6 A boots an unapproved command line", lambda: step6(vm, needles)),
    ]
    try:
        for name, run in steps:
            t = time.monotonic()
            try:
                detail, ok = run(), True
            except AssertionError as exc:
                serials = ", ".join(str(m.serial) for m in machines)
                detail, ok = f"{exc} (serial logs {serials})", False
            result = StepResult(name, ok, detail, time.monotonic() - t)
            results.append(result)
            say(result.line())
            if not ok:
                break
    finally:
        for machine in machines:
            machine.kill()
        broker.stop()
        say(f"total wall time {time.monotonic() - started:.1f} s; logs in {work}")
    return results


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="kl-vm-"))
    work.mkdir(parents=True, exist_ok=True)
    results = run_scenario(work)
    (work / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0 if len(results) == 6 and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

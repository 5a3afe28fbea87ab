"""A rolling kernel update through component policies, end to end: real swtpms whose PCRs were
extended with the events of the boot event log each agent sends, the real broker over TLS, the two
command lines. A policy learned from node A; node B boots a new kernel and is denied naming that
boot application; `policy allow --from-node B --component boot-app.3` releases B and A still
passes; node C with a changed db is denied naming db. Then the committed OVMF boots the same way."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from harness.boots import KERNEL_28, SPEC, boot_events_into
from harness.boots import boot as boot_spec
from harness.broker import Broker, agent
from harness.eventlog import (
    BootSpec,
    LogEvent,
    oracle_events,
    signing_certificate,
)
from harness.keys import write_key
from harness.nodes import Node
from harness.operator import ok

NodeFactory = Callable[..., Node]
DATA = Path(__file__).resolve().parents[1] / "data" / "eventlogs"


def booted(make_node: NodeFactory, name: str, events: Sequence[LogEvent], log: bytes) -> Node:
    """A node with its own TPM whose PCRs hold ``events``, its agent sending ``log``."""
    node = make_node(name, distinct=True)
    boot_events_into(node, events, log)
    return node


def boot(make_node: NodeFactory, name: str, spec: BootSpec) -> Node:
    node = make_node(name, distinct=True)
    boot_spec(node, spec)
    return node


def approve(broker: Broker, node: Node) -> None:
    first = node.attest()
    assert first.returncode == 3, first
    ok(broker.kbs("node", "approve", node.name, "--label", "cluster=prod"))


def test_rolling_kernel_update(broker: Broker, make_node: NodeFactory, tmp_path: Path) -> None:
    a = boot(make_node, "node-a", SPEC)
    approve(broker, a)
    learned = broker.kbs("policy", "learn", "prod-boot", "--from-node", "node-a")
    ok(learned)
    assert "+ boot-app.3: " in learned.stdout
    ok(broker.kbs("policy", "assign", "prod-boot", "--selector", "cluster=prod"))
    key = write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()))
    ok(broker.kbs("key", "import", "prod-key", "--private-key", str(key)))
    ok(broker.kbs("grant", "add", "prod-key", "--selector", "cluster=prod"))
    ok(a.attest())
    assert a.key_file("prod-key").exists()

    # B boots a new kernel: one boot application differs, and the denial names it.
    b = boot(make_node, "node-b", KERNEL_28)
    approve(broker, b)
    denied = b.attest()
    assert denied.returncode == 4, denied
    expected = (
        "PCR 4, boot application 3 [boot-app.3] (\\EFI\\debian\\vmlinuz-6.1.0-28-amd64): digest "
    )
    assert expected in denied.stderr
    assert "is not allowed by policy prod-boot (allowed: \\EFI\\debian\\vmlinuz-6.1.0-27" in (
        denied.stderr
    )
    for other in ("firmware", "[db]", "kernel-cmdline", "boot-app.1", "boot-app.2"):
        assert other not in denied.stderr
    # ... the same text in node show, the audit log and the agent's status
    shown = json.loads(broker.kbs("node", "show", "node-b", "--json").stdout)
    assert expected in shown["last_denial"]
    components = {c["name"]: c for c in shown["boot_state"]["sha256"]["components"]}
    assert components["boot-app.3"]["summary"] == "\\EFI\\debian\\vmlinuz-6.1.0-28-amd64"
    assert expected in broker.kbs("node", "show", "node-b").stdout
    assert any(expected in ln for ln in broker.kbs("audit", "--node", "node-b").stdout.splitlines())
    status = agent(b.config_path, "status")
    assert expected in status.stdout, status
    diff = json.loads(
        broker.kbs("policy", "diff", "prod-boot", "--node", "node-b", "--json").stdout
    )
    assert [r["component"] for r in diff if r["result"] == "fail"] == ["boot-app.3"]

    # The operator allows what the canary shows for that component: B released, A still is.
    allowed = broker.kbs(
        "policy", "allow", "prod-boot", "--from-node", "node-b", "--component", "boot-app.3"
    )
    ok(allowed)
    assert "+ boot-app.3: " in allowed.stdout
    assert "vmlinuz-6.1.0-28-amd64; allowed from node-b" in allowed.stdout
    again = broker.kbs(
        "policy", "allow", "prod-boot", "--from-node", "node-b", "--component", "boot-app.3"
    )
    assert "no change" in again.stdout
    ok(b.attest())
    assert b.key_file("prod-key").exists()
    ok(a.attest())
    shown_policy = broker.kbs("policy", "show", "prod-boot").stdout
    assert "vmlinuz-6.1.0-27-amd64; learned from node-a" in shown_policy
    assert "vmlinuz-6.1.0-28-amd64; allowed from node-b" in shown_policy

    # C's db holds one more certificate: denied naming db.
    c = boot(
        make_node, "node-c", replace(SPEC, db_certs=(*SPEC.db_certs, signing_certificate("X")))
    )
    approve(broker, c)
    denied_c = c.attest()
    assert denied_c.returncode == 4, denied_c
    assert "PCR 7, db [db] (2 entries: x509 CN=Debian Secure Boot CA, x509 CN=X)" in (
        denied_c.stderr
    )
    assert "boot application" not in denied_c.stderr

    # A policy that names components denies a node that sends no log, saying how to fix it.
    a.event_log = None
    no_log = a.attest()
    assert no_log.returncode == 4, no_log
    assert "sent no boot event log: set event_log in agent.toml" in no_log.stderr
    assert not a.key_file("prod-key").exists()


def test_policy_file_export_apply(broker: Broker, make_node: NodeFactory, tmp_path: Path) -> None:
    a = boot(make_node, "node-a", SPEC)
    approve(broker, a)
    ok(broker.kbs("policy", "learn", "prod-boot", "--from-node", "node-a"))
    ok(broker.kbs("policy", "assign", "prod-boot", "--selector", "cluster=prod"))
    path = tmp_path / "prod-boot.toml"
    ok(broker.kbs("policy", "export", "prod-boot", "--out", str(path)))
    text = path.read_text()
    assert 'selectors = ["cluster=prod"]' in text
    assert "no change" in broker.kbs("policy", "apply", str(path)).stdout
    # Reviewed edit: Secure Boot must be on, whatever else; the copy under another name.
    edited = text.replace('name = "prod-boot"', 'name = "sb-on"').replace(
        'selectors = ["cluster=prod"]', 'selectors = ["cluster=prod", "region=eu"]'
    )
    path.write_text(edited)
    applied = broker.kbs("policy", "apply", str(path))
    ok(applied)
    assert "+ policy sb-on (sha256)" in applied.stdout
    assert "+ assigned to region=eu" in applied.stdout
    assert "no change" in broker.kbs("policy", "apply", str(path)).stdout
    # Bad input: one clear error, nothing changed.
    path.write_text(edited.replace('bank = "sha256"', 'bank = "md5"'))
    bad = broker.kbs("policy", "apply", str(path))
    assert bad.returncode == 2, bad
    assert "unsupported PCR bank 'md5'" in bad.stderr
    # Two policies that no node could pass together are refused at assignment.
    conflicting = tmp_path / "off.toml"
    conflicting.write_text(
        'name = "sb-off"\nselectors = ["region=eu"]\n'
        '[components."secure-boot"]\nallow = [{ value = "off", note = "lab machines" }]\n'
    )
    refused = broker.kbs("policy", "apply", str(conflicting))
    assert refused.returncode == 2, refused
    assert "allow no common value for component secure-boot" in refused.stderr
    listed = json.loads(broker.kbs("policy", "list", "--json").stdout)
    assert [p["name"] for p in listed] == ["prod-boot", "sb-on"]


@pytest.mark.parametrize("bank_log", ["ovmf-base", "ovmf-multibank"])
def test_real_ovmf_boots(
    broker: Broker, make_node: NodeFactory, tmp_path: Path, bank_log: str
) -> None:
    """The committed OVMF logs (events replayed into swtpms with tpm2_eventlog's digests): a
    changed kernel command line is denied naming it, then allowed."""
    base = DATA / f"{bank_log}.bin"
    a = booted(make_node, "vm-a", oracle_events(base), base.read_bytes())
    approve(broker, a)
    ok(broker.kbs("policy", "learn", "vm-boot", "--from-node", "vm-a"))
    ok(broker.kbs("policy", "assign", "vm-boot", "--selector", "cluster=prod"))
    key = write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()))
    ok(broker.kbs("key", "import", "vm-key", "--private-key", str(key)))
    ok(broker.kbs("grant", "add", "vm-key", "--selector", "cluster=prod"))
    ok(a.attest())
    changed = DATA / "ovmf-cmdline.bin"
    b = booted(make_node, "vm-b", oracle_events(changed), changed.read_bytes())
    approve(broker, b)
    denied = b.attest()
    assert denied.returncode == 4, denied
    assert "PCR 8,9, kernel command line [kernel-cmdline] (EFI stub kernel command line" in (
        denied.stderr
    )
    ok(broker.kbs("policy", "allow", "vm-boot", "--from-node", "vm-b"))
    ok(b.attest())
    ok(a.attest())

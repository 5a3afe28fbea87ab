"""Update-aware sealing (issue 11), end to end with real swtpms, the real broker over TLS and
`keylease-agent run`: a node sealed under state A restores offline after a reboot into state B
that the broker approved from a canary, and nothing else opens — a state never approved (the log
names the component), an approval past its TPM-time limit, a forged approval, an approval for
another policy group. The node's wall clock moved far forward or back changes nothing; its TPM
clock does."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.keystore import ApprovalStore
from agent.state import StateDir
from agent.tpm import Tpm
from harness.agents import Agents
from harness.boots import KERNEL_28, KERNEL_29, SPEC, boot
from harness.broker import Broker, agent
from harness.daemon import AgentDaemon, NotifySocket, faketime
from harness.forge import broker_signer, forged_approval, stranger_signer
from harness.keys import write_key
from harness.nodes import Node
from harness.operator import ok
from harness.swtpm import set_clock

NodeFactory = Callable[..., Node]
FAST = ["retry_max_seconds = 2", "startup_timeout_seconds = 3"]
KERNEL_28_PATH = "\\EFI\\debian\\vmlinuz-6.1.0-28-amd64"


def key_files(node: Node) -> list[Path]:
    return sorted(
        p for d in node.key_dirs if (d / "keylease").is_dir() for p in (d / "keylease").iterdir()
    )


class Runs(Agents):
    """`keylease-agent run` for a node, as often as a test starts it; each with its own log."""

    def start(self, node: Node, prefix: Sequence[str] = ()) -> tuple[AgentDaemon, NotifySocket]:
        return self.run(node, prefix, probe=lambda: key_files(node))

    def restore(self, node: Node, prefix: Sequence[str] = ()) -> tuple[AgentDaemon, bool]:
        """Start the agent with the broker stopped (the key tmpfs empty, as after a reboot);
        whether READY came with the key (the key files there at READY); stopped again. How
        long a restore takes is measured by ``scripts.bench_daemon --approvals``."""
        for path in key_files(node):
            path.unlink()
        daemon, sock = self.start(node, prefix)
        ready = sock.ready(15)
        assert ready is not None, daemon.log()
        restored = ready.fields["STATUS"].startswith("1 key")
        if restored:
            assert ready.observed, "READY before the key files existed"
        assert daemon.stop() == 0
        return daemon, restored


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    started = Runs(tmp_path)
    yield started
    started.close()


def enrolled(broker: Broker, make_node: NodeFactory, name: str, spec: object) -> Node:
    node = make_node(name, distinct=True)
    node.config_extra = list(FAST)
    boot(node, spec)  # type: ignore[arg-type]
    assert node.attest().returncode == 3
    ok(broker.kbs("node", "approve", name, "--label", "cluster=prod"))
    return node


@pytest.fixture
def fleet(broker: Broker, make_node: NodeFactory, tmp_path: Path) -> tuple[Node, Node]:
    """Node A on kernel 27 holding its key, a policy learned from it; canary B on kernel 28,
    denied naming the boot application."""
    a = enrolled(broker, make_node, "node-a", SPEC)
    ok(broker.kbs("policy", "learn", "prod-boot", "--from-node", "node-a"))
    ok(broker.kbs("policy", "assign", "prod-boot", "--selector", "cluster=prod"))
    key = write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()))
    ok(broker.kbs("key", "import", "prod-key", "--private-key", str(key)))
    ok(broker.kbs("grant", "add", "prod-key", "--selector", "cluster=prod"))
    b = enrolled(broker, make_node, "node-b", KERNEL_28)
    denied = b.attest()
    assert denied.returncode == 4
    assert "PCR 4, boot application 3 [boot-app.3]" in denied.stderr
    return a, b


def held(node: Node) -> list[str]:
    return [a.origin for a in ApprovalStore(StateDir.open(node.root / "state")).load()]


def plant(node: Node, approval: object) -> None:
    store = ApprovalStore(StateDir.open(node.root / "state"))
    store.merge([approval], None)  # type: ignore[list-item]


def tpm_state(node: Node, bank: str = "sha256") -> dict[int, bytes]:
    with Tpm.open(node.tpm.tcti) as tpm:
        return tpm.read_pcrs(bank, range(8))


def test_an_approved_update_restores_offline_and_nothing_else_opens(
    broker: Broker, fleet: tuple[Node, Node], runs: Runs, tmp_path: Path
) -> None:
    a, _canary = fleet
    daemon, sock = runs.start(a)
    assert sock.ready(30) is not None, daemon.log()
    assert held(a) == ["verified"]

    # The operator allows the canary's kernel: A's agent is pushed the approvals at once.
    ok(broker.kbs("policy", "allow", "prod-boot", "--from-node", "node-b",
                  "--component", "boot-app.3"))  # fmt: skip
    assert daemon.wait_log("kept approvals from the watch stream (policy prod-boot:", 10), (
        daemon.log()
    )
    assert "canary node-b" in daemon.log()
    assert daemon.stop() == 0
    assert set(held(a)) >= {"verified", "canary node-b"}
    broker.stop()

    # A reboots into the canary's kernel, the broker down: restored from the cache, offline.
    boot(a, KERNEL_28, reboot=True)
    run, restored = runs.restore(a)
    assert restored, run.log()
    line = next(ln for ln in run.log().splitlines() if "restored prod-key@v1" in ln)
    assert "with approved state policy prod-boot: " in line
    assert KERNEL_28_PATH in line
    assert "canary node-b" in line

    # C: a kernel nothing approves. Nothing opens; the log names the boot application.
    boot(a, KERNEL_29, reboot=True)
    run, restored = runs.restore(a)
    assert not restored, run.log()
    assert key_files(a) == []
    found = re.search(
        r"no approved state matches this boot: PCR 4, boot application 3 \[boot-app\.3\] "
        r"\(\\EFI\\debian\\vmlinuz-6\.1\.0-29-amd64\): digest \S+ is not allowed by policy "
        r"prod-boot \(allowed: .*vmlinuz-6\.1\.0-2[78]-amd64",
        run.log(),
    )
    assert found is not None, run.log()

    # A forged approval of C (another CA's key): nothing opens, and the log says why.
    c_state = tpm_state(a)
    clock = clock_of(a)
    plant(a, forged_approval(stranger_signer(tmp_path), "node-a", "prod-boot", c_state,
                             clock + 3_600_000, origin="planted"))  # fmt: skip
    run, restored = runs.restore(a)
    assert not restored, run.log()
    assert "not using an approval of this boot state (planted): it is not signed by the key" in (
        run.log()
    )
    # The broker's own key, but for another policy group: nothing opens either.
    genuine = broker_signer(broker)
    plant(a, forged_approval(genuine, "node-a", "lab-boot", c_state, clock + 3_600_000,
                             origin="other group"))  # fmt: skip
    run, restored = runs.restore(a)
    assert not restored, run.log()
    assert "(other group): it is for policy lab-boot, not prod-boot" in run.log()
    # ... while the same approval for the cache's own group opens it: the refusals above were
    # the approvals', not the TPM's.
    plant(a, forged_approval(genuine, "node-a", "prod-boot", c_state, clock + 3_600_000,
                             origin="the broker's key"))  # fmt: skip
    run, restored = runs.restore(a)
    assert restored, run.log()

    # B again: the node's wall clock ten years on, or ten years back, changes nothing...
    boot(a, KERNEL_28, reboot=True)
    for shift in ("+3650d", "-3650d"):
        run, restored = runs.restore(a, faketime(shift))
        assert restored, (shift, run.log())
        seen = json.loads((a.root / "state" / "status.json").read_text())["updated_at"]
        assert abs(int(seen[:4]) - datetime.now(UTC).year) >= 9, f"faketime {shift}: {seen}"
    # ... the TPM's clock past the approval's limit does: nothing opens, the lease ended.
    set_clock(a.tpm.tcti, clock_of(a) + 3_700_000)
    run, restored = runs.restore(a)
    assert not restored, run.log()
    assert "lease ended at TPM clock" in run.log() or "expired" in run.log(), run.log()


def clock_of(node: Node) -> int:
    with Tpm.open(node.tpm.tcti) as tpm:
        return tpm.clock().clock


def test_an_expired_approval_opens_nothing_and_says_so(
    broker: Broker, fleet: tuple[Node, Node], runs: Runs
) -> None:
    """An approval past its TPM-time limit while the lease still runs (a shorter
    approval_ttl_seconds): nothing opens, the cache and the keys' lease stay."""
    a, _ = fleet
    broker.restart(approval_ttl_seconds=60)
    ok(a.attest())
    broker.stop()
    set_clock(a.tpm.tcti, clock_of(a) + 61_000)
    run, restored = runs.restore(a)
    assert not restored, run.log()
    expired = r"the approval of this boot state \(policy prod-boot: .*\) expired: its TPM clock"
    assert re.search(expired + r" limit is \d+, the TPM's clock is \d+", run.log()), run.log()
    assert (a.root / "state" / "release.bin").exists(), "an expired approval is no verdict"


def test_approvals_come_with_every_release_and_status_lists_them(
    broker: Broker, fleet: tuple[Node, Node], runs: Runs, make_node: NodeFactory
) -> None:
    """A node that was not watching when the policy widened gets the new states with its next
    release; `keylease-agent status` lists each approved state and when it expires."""
    a, _ = fleet
    ok(a.attest())
    ok(broker.kbs("policy", "allow", "prod-boot", "--from-node", "node-b",
                  "--component", "boot-app.3"))  # fmt: skip
    assert held(a) == ["verified"], "A was not watching"
    ok(a.attest())
    assert set(held(a)) >= {"verified", "canary node-b"}
    report = json.loads(agent(a.config_path, "status", "--json").stdout)
    approvals = report["approvals"]
    assert {x["origin"] for x in approvals} >= {"verified", "canary node-b"}
    for x in approvals:
        assert x["policy"] == "prod-boot"
        assert x["tpm_clock_limit"] > report["tpm_clock"]
        assert x["expires_at_estimate"] is not None
        assert not x["expired"]
        assert {"boot-app.3", "firmware", "db"} <= {c["name"] for c in x["components"]}
    text = agent(a.config_path, "status").stdout
    assert "approvals:        " in text
    assert "TPM clock limit" in text
    assert KERNEL_28_PATH in text
    # a verdict on the node (its boot denied) drops the cache and its approvals with the keys
    boot(a, KERNEL_29, reboot=True)
    assert a.attest().returncode == 4
    assert held(a) == []

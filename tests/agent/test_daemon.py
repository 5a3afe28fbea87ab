"""`keylease-agent run` as a real daemon: a subprocess with a test-owned NOTIFY_SOCKET, a real
broker over TLS, real swtpms. Each test is one scenario of the daemon issue."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent.keystore import SealedCache
from agent.state import StateDir
from agent.tpm import Tpm
from harness.broker import Broker, agent
from harness.daemon import AgentDaemon, NotifySocket
from harness.forge import broker_signer, forged_release, stranger_signer
from harness.keys import write_key
from harness.nodes import Node
from harness.operator import grant_node, ok

NodeFactory = Callable[..., Node]
FAST = ["retry_max_seconds = 2", "startup_timeout_seconds = 3"]


def key_files(node: Node) -> list[Path]:
    return sorted(
        p for d in node.key_dirs if (d / "keylease").is_dir() for p in (d / "keylease").iterdir()
    )


def status(node: Node) -> dict[str, object]:
    data: dict[str, object] = json.loads((node.root / "state" / "status.json").read_text())
    return data


@pytest.fixture
def granted(broker: Broker, make_node: NodeFactory, tmp_path: Path) -> Node:
    node = make_node("daemon-1")
    node.config_extra = list(FAST)
    assert node.attest().returncode == 3
    grant_node(broker, node, write_key(tmp_path / "k.pem", rsa.generate_private_key(65537, 2048)))
    return node


@pytest.fixture
def daemon_for(tmp_path: Path) -> Iterator[Callable[..., tuple[AgentDaemon, NotifySocket]]]:
    started: list[tuple[AgentDaemon, NotifySocket]] = []
    counter = iter(range(100))

    def start(node: Node) -> tuple[AgentDaemon, NotifySocket]:
        n = next(counter)
        node.write_config()
        sock = NotifySocket(tmp_path / f"notify-{n}.sock", probe=lambda: key_files(node))
        daemon = AgentDaemon(node.config_path, tmp_path / f"agent-{n}.log", sock).start()
        started.append((daemon, sock))
        return daemon, sock

    yield start
    for daemon, sock in started:
        daemon.kill()
        sock.close()


def test_ready_only_after_the_key_files_exist(
    granted: Node, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    daemon, sock = daemon_for(granted)
    ready = sock.ready(30)
    assert ready is not None, daemon.log()
    assert len(ready.observed) == 2, f"READY before the keys were installed: {ready.observed}"  # type: ignore[arg-type]
    assert ready.fields["STATUS"].startswith("1 key, lease until"), ready.fields
    assert status(granted)["state"] == "keys installed"
    t0 = time.monotonic()
    assert daemon.stop(10) == 0
    assert time.monotonic() - t0 < 10
    assert len(key_files(granted)) == 2, "keys stay installed on stop by default"
    report = agent(granted.config_path, "status", "--json")
    assert report.returncode == 0, report
    data = json.loads(report.stdout)
    assert data["enrolled"] is True
    assert data["state"] == "stopped"
    assert [(e["name"], e["version"], Path(e["file"]).name)
            for d in data["key_dirs"].values() for e in d] == [
        ("prod-key", 1, "prod-key.v1.pem"), ("prod-key", 1, "prod-key.v1.pem")
    ]  # fmt: skip


def test_restart_with_the_broker_stopped_restores_from_the_sealed_cache(
    granted: Node, broker: Broker, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    daemon, sock = daemon_for(granted)
    assert sock.ready(30) is not None, daemon.log()
    assert daemon.stop() == 0
    broker.stop()
    for path in key_files(granted):  # a reboot empties the tmpfs
        path.unlink()
    daemon, sock = daemon_for(granted)
    ready = sock.ready(10)
    assert ready is not None, daemon.log()
    assert len(ready.observed) == 2  # type: ignore[arg-type]
    assert status(granted)["source"] == "cache"
    assert "restored prod-key@v1 from the sealed cache" in daemon.log()


def test_state_copied_next_to_another_tpm_restores_nothing(
    granted: Node,
    broker: Broker,
    make_node: NodeFactory,
    daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]],
) -> None:
    daemon, sock = daemon_for(granted)
    assert sock.ready(30) is not None, daemon.log()
    assert daemon.stop() == 0
    broker.stop()
    thief = make_node(granted.name, distinct=True)
    thief.config_extra = list(FAST)
    shutil.copytree(granted.root / "state", thief.root / "state")
    daemon, sock = daemon_for(thief)
    ready = sock.ready(15)
    assert ready is not None, daemon.log()
    assert ready.fields["STATUS"].startswith("no keys"), ready.fields
    assert ready.observed == []
    assert "nothing restored from the sealed cache" in daemon.log()
    assert "does not open" in daemon.log() or "this TPM" in daemon.log()
    assert key_files(thief) == []


def test_pcr_change_then_restart_restores_nothing_and_only_a_verdict_removes_the_keys(
    granted: Node, broker: Broker, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    """A cache that no longer opens is no verdict: the keys installed before stay until the
    lease the agent recorded ends; the broker's denial of the new boot state removes them."""
    daemon, sock = daemon_for(granted)
    assert sock.ready(30) is not None, daemon.log()
    assert daemon.stop() == 0
    broker.stop()
    with Tpm.open(granted.tpm.tcti) as tpm:
        tpm.extend_pcr(7, b"another bootloader")
    daemon, sock = daemon_for(granted)
    ready = sock.ready(15)
    assert ready is not None, daemon.log()
    assert ready.fields["STATUS"].startswith("1 key, lease until"), ready.fields
    assert "keys kept until the lease ends" in ready.fields["STATUS"]
    assert "nothing restored from the sealed cache" in daemon.log()
    assert "no approved state matches this boot: PCR 7 (sha256) holds a value" in daemon.log()
    assert len(key_files(granted)) == 2, "no verdict yet: the keys stay until the lease ends"
    assert (granted.root / "state" / "release.bin").exists(), "the cache stays too"
    broker.restart()  # same port: the agent's next retry reaches it and is denied (PCR 7)
    deadline = time.monotonic() + 20
    while key_files(granted) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert key_files(granted) == [], daemon.log()
    assert daemon.wait_log("PCR 7", 5), daemon.log()
    assert not (granted.root / "state" / "release.bin").exists()


def test_lease_expiry_with_the_broker_stopped_removes_the_keys(
    granted: Node, broker: Broker, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    broker.restart(lease_seconds=8)
    daemon, sock = daemon_for(granted)
    assert sock.ready(30) is not None, daemon.log()
    broker.stop()
    # the lease of the last release (the watch stream may have asked for a second one). The
    # agent measures it from before its attestation began, so it may end up to that attestation's
    # duration before the broker's not-after, which is in whole seconds: keys stay until one
    # second before it, and are gone two seconds after it.
    not_after = datetime.fromisoformat(str(status(granted)["lease_not_after"]))
    while datetime.now(UTC) < not_after - timedelta(seconds=1):
        assert len(key_files(granted)) == 2, "keys went before the lease's not-after"
        time.sleep(0.1)
    deadline = time.monotonic() + 3.0
    while key_files(granted) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert key_files(granted) == [], daemon.log()
    assert daemon.wait_log("without renewal", 5), daemon.log()  # logged just after the removal


def test_operator_revocation_removes_the_keys_within_5_seconds(
    granted: Node, broker: Broker, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    daemon, sock = daemon_for(granted)
    assert sock.ready(30) is not None, daemon.log()
    time.sleep(1.5)  # let the watch stream connect
    t0 = time.monotonic()
    ok(broker.kbs("node", "revoke", granted.name))
    while key_files(granted) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    assert key_files(granted) == [], daemon.log()
    assert elapsed < 5, elapsed
    # status.json is rewritten right after the files go: give it that moment
    deadline = time.monotonic() + 5
    while not status(granted)["last_denial_reason"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status(granted)["last_denial_reason"] == "the broker revoked this node", status(granted)


def test_rotation_adds_a_version_and_retirement_removes_one_through_the_watch_stream(
    granted: Node,
    broker: Broker,
    tmp_path: Path,
    daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]],
) -> None:
    """The daemon hears ``key rotate`` and ``key retire`` on its watch stream (CHANGED) and
    attests again: the new version's file appears beside the old one, which a reader keeps
    parsing without a single failure and which changes never; retiring the old version removes
    exactly its file."""
    daemon, sock = daemon_for(granted)
    assert sock.ready(30) is not None, daemon.log()
    v1_path = granted.key_file("prod-key", version=1)
    v2_path = granted.key_file("prod-key", version=2)
    old = v1_path.read_bytes()
    new_key = write_key(tmp_path / "k2.pem", ec.generate_private_key(ec.SECP384R1()))
    seen: list[bytes] = []
    problems: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                data = v1_path.read_bytes()
                load_pem_private_key(data, None)
            except (OSError, ValueError) as exc:
                problems.append(repr(exc))
                continue
            if not seen or seen[-1] != data:
                seen.append(data)

    def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        return condition()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(1.0)
        ok(broker.kbs("key", "rotate", "prod-key", "--private-key", str(new_key)))
        assert wait_for(v2_path.exists), daemon.log()
        time.sleep(0.5)  # the reader keeps reading v1 after v2 appeared
    finally:
        stop.set()
        reader.join()
    assert problems == []
    digests = [hashlib.sha256(data).hexdigest()[:16] for data in seen]  # no key bytes in output
    assert digests == [hashlib.sha256(old).hexdigest()[:16]], daemon.log()
    assert v2_path.read_bytes() == new_key.read_bytes()
    assert [p.name for p in key_files(granted)] == ["prod-key.v1.pem", "prod-key.v2.pem"] * 2

    ok(broker.kbs("key", "retire", "prod-key", "--version", "1"))
    assert wait_for(lambda: not v1_path.exists()), daemon.log()
    assert [p.name for p in key_files(granted)] == ["prod-key.v2.pem"] * 2
    assert v2_path.read_bytes() == new_key.read_bytes()
    assert daemon.wait_log("broker: grants or keys changed", 5), daemon.log()


def test_sigkill_during_installation_leaves_no_partial_or_stray_file(
    broker: Broker,
    make_node: NodeFactory,
    tmp_path: Path,
    daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]],
) -> None:
    node = make_node("kill-9")
    node.config_extra = list(FAST)
    assert node.attest().returncode == 3
    grant_node(broker, node, write_key(tmp_path / "k0.pem", rsa.generate_private_key(65537, 2048)))
    for i in range(1, 12):
        name = f"extra-{i}"
        key = write_key(tmp_path / f"{name}.pem", ec.generate_private_key(ec.SECP256R1()))
        ok(broker.kbs("key", "import", name, "--private-key", str(key)))
        ok(broker.kbs("grant", "add", name, "--selector", "cluster=prod"))
    rng = random.Random(7)
    for _ in range(6):
        daemon, _sock = daemon_for(node)
        time.sleep(rng.uniform(0.3, 1.5))
        daemon.signal(signal.SIGKILL)
        daemon.proc.wait()  # type: ignore[union-attr]
        for path in key_files(node):
            assert path.name.endswith(".pem"), path
            assert not path.name.startswith("."), path
            assert path.is_file()
            load_pem_private_key(path.read_bytes(), None)
    # The last start must install everything: READY comes with the keys, not after a short
    # start-up timeout that a loaded CI machine can reach first.
    node.config_extra = ["retry_max_seconds = 2", "startup_timeout_seconds = 60"]
    daemon, sock = daemon_for(node)
    assert sock.ready(60) is not None, daemon.log()
    assert len(key_files(node)) == 24, daemon.log()


def test_sighup_with_a_broken_config_keeps_the_old_one(
    granted: Node, broker: Broker, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    daemon, sock = daemon_for(granted)
    assert sock.ready(30) is not None, daemon.log()
    good = granted.config_path.read_text()
    granted.config_path.write_text(good + "colour = 1\n")
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_log("the new configuration is refused", 5), daemon.log()
    assert "unknown key(s) colour" in daemon.log()
    assert daemon.alive()
    granted.config_path.write_text(good)
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_log("configuration reloaded", 5), daemon.log()
    ok(broker.kbs("node", "revoke", granted.name))  # and the loop still acts
    deadline = time.monotonic() + 5
    while key_files(granted) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert key_files(granted) == []


def test_broker_unreachable_at_start_then_reachable(
    granted: Node, broker: Broker, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    broker.restart()  # pins the port, so the agent's address stays right
    broker.stop()
    granted.config_extra = ["retry_max_seconds = 2", "startup_timeout_seconds = 60"]
    daemon, sock = daemon_for(granted)
    unreachable = sock.wait_for(lambda m: "unreachable" in m.fields.get("STATUS", ""), 15)
    assert unreachable is not None, daemon.log()
    broker.start()
    ready = sock.ready(15)
    assert ready is not None, daemon.log()
    assert len(ready.observed) == 2  # type: ignore[arg-type]


def test_second_signal_exits_at_once(
    granted: Node, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    daemon, sock = daemon_for(granted)
    assert sock.ready(30) is not None, daemon.log()
    daemon.signal(signal.SIGTERM)
    daemon.signal(signal.SIGINT)
    assert daemon.stop(5) in (0, 1)


def test_a_busy_brokers_retry_hint_is_a_floor_for_the_next_attempt(
    granted: Node, broker: Broker, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    # one request per 10 s per node: the daemon's first attempt is refused with a ~10 s hint,
    # far above its own backoff ceiling (retry_max_seconds = 2)
    broker.restart(rate_limit_node_per_second=0.1, rate_limit_node_burst=1)
    granted.config_extra = ["retry_max_seconds = 2", "startup_timeout_seconds = 60"]
    daemon, _sock = daemon_for(granted)
    assert daemon.wait_log("retrying in", 20), daemon.log()
    time.sleep(4)  # two backoff ceilings; the watch stream opening asks for an attempt too
    lines = [ln for ln in daemon.log().splitlines() if "retrying in" in ln]
    assert len(lines) == 1, daemon.log()
    hint_ms = int(re.search(r"retry in (\d+) ms", lines[0]).group(1))  # type: ignore[union-attr]
    delay = float(re.search(r"retrying in ([\d.]+) s", lines[0]).group(1))  # type: ignore[union-attr]
    assert hint_ms >= 5000, lines[0]
    assert hint_ms / 1000 <= delay <= hint_ms / 1000 * 1.25 + 0.1, lines[0]


# --- issue 10: what a stranger who can write files cannot make the agent do -------------------


def _restart_with(
    granted: Node,
    broker: Broker,
    daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]],
    plant: Callable[[SealedCache], None],
) -> tuple[AgentDaemon, NotifySocket, dict[Path, bytes]]:
    """Keys installed by a daemon, the daemon stopped (keys stay), the broker down, ``plant``
    run on the cache, the daemon started again; returns it and the key files as they were."""
    daemon, sock = daemon_for(granted)
    assert sock.ready(30) is not None, daemon.log()
    assert daemon.stop() == 0
    broker.stop()
    before = {p: p.read_bytes() for p in key_files(granted)}
    assert len(before) == 2
    plant(SealedCache(StateDir.open(granted.config().state_dir)))
    daemon, sock = daemon_for(granted)
    return daemon, sock, before


@pytest.mark.parametrize("planted", ["signed-by-a-stranger", "altered", "unsigned"])
def test_a_planted_release_bin_is_refused_and_the_keys_kept(
    granted: Node,
    broker: Broker,
    daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]],
    tmp_path: Path,
    planted: str,
) -> None:
    """A release made for this very TPM and PCR state by someone who can write the state
    directory: not signed by the broker, so nothing of it is installed, and the keys installed
    before stay until their lease ends."""
    evil = write_key(tmp_path / "evil.pem", ec.generate_private_key(ec.SECP256R1())).read_bytes()
    cfg = granted.config()
    expected = {
        "signed-by-a-stranger": "not issued by the broker's CA",
        "altered": "signature does not verify",
        "unsigned": "not signed by the broker",
    }[planted]

    def plant(cache: SealedCache) -> None:
        if planted == "signed-by-a-stranger":
            blob = forged_release(cfg, stranger_signer(tmp_path), [("prod-key", 9, evil)])
        else:
            genuine = cache.load()
            assert genuine is not None
            ciphertext = bytearray(genuine.bundle_ciphertext)
            ciphertext[0] ^= 1
            blob = dataclasses.replace(genuine, bundle_ciphertext=bytes(ciphertext))
            if planted == "unsigned":
                blob = dataclasses.replace(genuine, signature=b"", signing_certificate=b"")
        cache.save(blob, {})

    daemon, sock, before = _restart_with(granted, broker, daemon_for, plant)
    ready = sock.ready(15)
    assert ready is not None, daemon.log()
    assert "keys kept until the lease ends" in ready.fields["STATUS"], ready.fields
    assert expected in daemon.log()
    assert {p: p.read_bytes() for p in key_files(granted)} == before
    assert status(granted)["lease_not_after"] is not None
    assert daemon.alive()


def test_a_cache_whose_lease_ends_in_2_to_the_62_is_refused_and_the_daemon_keeps_running(
    granted: Node, broker: Broker, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    """Signed by the broker's own key (as if it had a bug): refused at parse with a clear error
    (it used to kill the worker thread, and the process exited 0)."""
    cfg = granted.config()

    def plant(cache: SealedCache) -> None:
        pem = granted.key_file("prod-key").read_bytes()
        blob = forged_release(cfg, broker_signer(broker), [("prod-key", 1, pem)], not_after=2**62)
        cache.save(blob, {})

    daemon, sock, before = _restart_with(granted, broker, daemon_for, plant)
    assert sock.ready(15) is not None, daemon.log()
    assert daemon.wait_log("the release's lease times are out of range", 5), daemon.log()
    time.sleep(2)
    assert daemon.alive(), daemon.log()
    assert "Traceback" not in daemon.log()
    assert {p: p.read_bytes() for p in key_files(granted)} == before
    broker.restart()  # the broker is back: the next attestation replaces the cache
    assert daemon.wait_log("attested: prod-key@v1 installed", 20), daemon.log()


def test_a_worker_thread_that_dies_makes_the_daemon_exit_non_zero(
    granted: Node, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]], tmp_path: Path
) -> None:
    """So that systemd's Restart=on-failure starts it again (it used to exit 0). What kills the
    worker here: a key directory replaced by a symlink, which the keystore refuses to touch."""
    own = granted.key_dirs[0] / "keylease"
    own.parent.mkdir(parents=True, exist_ok=True)
    own.symlink_to(tmp_path)
    daemon, _ = daemon_for(granted)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 1, daemon.log()
    assert "worker thread died" in daemon.log()


def test_a_hardlink_planted_at_the_state_temp_path_is_not_written_through(
    granted: Node, tmp_path: Path
) -> None:
    state = granted.root / "state"
    precious = tmp_path / "precious"
    precious.write_bytes(b"not the agent's to write")
    os.link(precious, state / ".release.bin.tmp")
    (state / ".release-pcrs.json.tmp").symlink_to(precious)
    result = granted.attest()
    assert result.returncode == 0, result
    assert precious.read_bytes() == b"not the agent's to write"
    assert precious.stat().st_nlink == 1
    assert not (state / ".release.bin.tmp").exists()
    assert not (state / ".release-pcrs.json.tmp").is_symlink()
    assert "removed it unread" in result.stderr
    assert SealedCache(StateDir.open(state)).load() is not None


def test_the_daemon_locks_its_memory(
    granted: Node, daemon_for: Callable[..., tuple[AgentDaemon, NotifySocket]]
) -> None:
    daemon, sock = daemon_for(granted)
    assert sock.ready(30) is not None, daemon.log()
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines()
    )
    assert int(fields["VmLck"].split()[0]) > 10_000, fields["VmLck"]  # kB: the whole process
    assert "memory not locked" not in daemon.log()

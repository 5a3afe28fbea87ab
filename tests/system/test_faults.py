"""Fault injection (issue 10): each fault made real against `keylease-agent run` (a subprocess,
real swtpm) and a real broker, then the same four checks — no key lost that should stay, no key
kept that should go, no partial or stray file, and recovery by itself.

Faults: the broker killed mid-attestation; its database stopped (PostgreSQL), full or read-only
(SQLite on a small tmpfs of the broker's own mount namespace); the key directory's tmpfs full;
the state directory read-only; the TPM's object memory full; the agent SIGKILLed at the exact
system call that publishes a key file, or that renames the sealed cache into place (strace); the
wall clock stepped forward and back under the running agent (``harness/wallclock.c``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from tpm2_pytss import ESAPI, ESYS_TR, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TCTILdr, TSS2_Exception

from harness.agents import Agents
from harness.broker import Broker, pg_broker
from harness.daemon import AgentDaemon
from harness.faults import JumpingClock, fill, kill_at, private_tmpfs, remount, seen_by, unfill
from harness.keys import write_key
from harness.nodes import Node
from harness.operator import grant_node, ok
from harness.postgres import PostgresServer, postgres_fixture  # noqa: F401
from kbs.store import Store

NodeFactory = Callable[..., Node]
FAST = ["retry_max_seconds = 2", "startup_timeout_seconds = 30"]


# --- helpers ------------------------------------------------------------------------------------


def files_in(directory: Path) -> dict[str, bytes]:
    """Every entry of a key directory's ``keylease/``; each must be a complete key file."""
    owned = directory / "keylease"
    if not owned.is_dir():
        return {}
    found = {p.name: p.read_bytes() for p in owned.iterdir()}
    for name, data in found.items():
        assert name.endswith(".pem"), f"stray file {owned / name}"
        assert not name.startswith("."), f"stray file {owned / name}"
        load_pem_private_key(data, None)  # complete: a runtime can parse it
    return found


def keys_of(node: Node, pid: int | None = None) -> list[set[str]]:
    """The key files in each key directory (as process ``pid`` sees them, if given)."""
    dirs = [seen_by(pid, d) if pid else d for d in node.key_dirs]
    return [set(files_in(d)) for d in dirs]


def wait_until(condition: Callable[[], bool], timeout: float, what: str, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s\n{log[-3000:]}"
        time.sleep(0.1)


def import_and_grant(broker: Broker, tmp_path: Path, name: str) -> Path:
    key = write_key(tmp_path / f"{name}.pem", ec.generate_private_key(ec.SECP256R1()))
    ok(broker.kbs("key", "import", name, "--private-key", str(key)))
    ok(broker.kbs("grant", "add", name, "--selector", "cluster=prod"))
    return key


def releases(database: Path | str, node: str) -> int:
    with Store.open(database) as store:
        return sum(1 for e in store.list_audit(node=node, limit=1000) if e.event == "release")


def settled(database: Path | str, node: str, quiet: float = 2.0) -> int:
    """The node's release count once no attestation has happened for ``quiet`` seconds (the
    agent attests again when its watch stream first connects)."""
    count, since = releases(database, node), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.2)
        now = releases(database, node)
        if now != count:
            count, since = now, time.monotonic()
    return count


class Daemons(Agents):
    """Agents started by a test, each with its notify socket; all killed at teardown."""

    def start(
        self, node: Node, wrapper: list[str] | None = None, env: dict[str, str] | None = None
    ) -> AgentDaemon:
        return self.run(node, wrapper or (), env)[0]

    def ready(self, daemon: AgentDaemon, timeout: float = 60) -> None:
        assert self.socket(daemon).ready(timeout) is not None, daemon.log()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    started = Daemons(tmp_path)
    yield started
    started.close()


def granted_node(broker: Broker, make_node: NodeFactory, tmp_path: Path, name: str) -> Node:
    node = make_node(name)
    node.config_extra = list(FAST)
    assert node.attest().returncode == 3
    grant_node(broker, node, write_key(tmp_path / "k.pem", rsa.generate_private_key(65537, 2048)))
    return node


def attested(daemon: AgentDaemon) -> int:
    return daemon.log().count("attested: ")


# --- the broker ---------------------------------------------------------------------------------


def test_broker_killed_mid_attestation(
    broker: Broker, make_node: NodeFactory, tmp_path: Path, daemons: Daemons
) -> None:
    node = granted_node(broker, make_node, tmp_path, "mid-attest")
    database = broker.directory / "kbs.db"
    daemon = daemons.start(node)
    daemons.ready(daemon)
    assert keys_of(node) == [{"prod-key.v1.pem"}] * 2
    before = settled(database, node.name)
    killed = threading.Event()

    def kill_on_nonce() -> None:  # the nonce is issued: the quote and Attest are under way
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                query = "SELECT count(*) FROM nonces WHERE node_name = ?"
                if db.execute(query, (node.name,)).fetchone()[0]:
                    os.kill(broker.pid, signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.0005)

    watcher = threading.Thread(target=kill_on_nonce)
    key2 = write_key(tmp_path / "k2.pem", ec.generate_private_key(ec.SECP256R1()))
    ok(broker.kbs("key", "import", "second", "--private-key", str(key2)))
    watcher.start()
    ok(broker.kbs("grant", "add", "second", "--selector", "cluster=prod"))  # CHANGED: attest
    watcher.join()
    assert killed.is_set(), daemon.log()
    assert daemon.wait_log("attestation unreachable", 20), daemon.log()
    time.sleep(3)  # retries against no broker: the keys stay, whole
    assert keys_of(node) == [{"prod-key.v1.pem"}] * 2
    assert releases(database, node.name) == before  # killed before any release was recorded
    broker.restart()  # same address; the agent retries by itself
    wait_until(lambda: keys_of(node) == [{"prod-key.v1.pem", "second.v1.pem"}] * 2, 30,
               "the agent attests again once the broker is back", daemon.log())  # fmt: skip
    assert releases(database, node.name) == before + 1
    assert daemon.alive()


# --- the database -------------------------------------------------------------------------------


@pytest.fixture
def pg_node(
    postgres: PostgresServer,
    ek_roots: Path,
    make_node: NodeFactory,
    tmp_path: Path,
    broker: Broker,
) -> Iterator[tuple[Broker, Node, str]]:
    """A broker on its own PostgreSQL database, and a node it granted a key:
    (broker, node, database name)."""
    broker.stop()  # make_node's broker; this node talks to the PostgreSQL one
    url = postgres.create_database()
    pg = pg_broker(tmp_path / "pg-kbs", ek_roots, url)
    pg.start()
    try:
        node = make_node("pg-node")
        node.broker = pg
        node.config_extra = list(FAST)
        assert node.attest().returncode == 3
        grant_node(pg, node, write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1())))
        yield pg, node, url.split("/")[3].partition("?")[0]
    finally:
        pg.stop()


def refused_then_recovered(
    daemon: AgentDaemon, node: Node, fault: Callable[[], None], repair: Callable[[], None]
) -> None:
    """Inject ``fault``, make the agent attest (SIGHUP): refused, keys kept whole; ``repair``:
    the agent attests again by itself."""
    first = attested(daemon)
    fault()
    try:
        daemon.signal(signal.SIGHUP)  # attest now
        wait_until(lambda: daemon.log().count("attestation unreachable") >= 2, 30,
                   "attempts refused meanwhile", daemon.log())  # fmt: skip
        assert keys_of(node) == [{"prod-key.v1.pem"}] * 2
    finally:
        repair()
    wait_until(lambda: attested(daemon) > first, 60, "an attestation once repaired",
               daemon.log())  # fmt: skip
    assert keys_of(node) == [{"prod-key.v1.pem"}] * 2


def test_database_stopped(
    postgres: PostgresServer, pg_node: tuple[Broker, Node, str], daemons: Daemons
) -> None:
    _, node, _ = pg_node
    daemon = daemons.start(node)
    daemons.ready(daemon)
    refused_then_recovered(daemon, node, lambda: postgres.stop("immediate"), postgres.start)
    assert "database" in daemon.log()  # the refusal named it


def test_database_read_only(
    postgres: PostgresServer, pg_node: tuple[Broker, Node, str], daemons: Daemons
) -> None:
    """A database that only reads (a standby, or default_transaction_read_only): no nonce can
    be issued, no attestation recorded."""
    pg, node, name = pg_node
    daemon = daemons.start(node)
    daemons.ready(daemon)

    def read_only(on: bool) -> None:
        value = "on" if on else "off"
        postgres.sql(
            "postgres", f"ALTER DATABASE {name} SET default_transaction_read_only = {value}"
        )
        terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %r"
        postgres.sql("postgres", terminate.replace("%r", f"'{name}'"))

    refused_then_recovered(daemon, node, lambda: read_only(True), lambda: read_only(False))
    assert "read-only transaction" in pg.log()


def test_database_full(
    broker: Broker, make_node: NodeFactory, tmp_path: Path, daemons: Daemons
) -> None:
    node = granted_node(broker, make_node, tmp_path, "db-full")
    broker.stop()
    dbfs = tmp_path / "dbfs"  # the broker's own small tmpfs, its SQLite database copied in
    dbfs.mkdir()
    broker.wrapper = private_tmpfs(
        {dbfs: "size=4m,mode=0700"}, then=f"cp {broker.directory}/kbs.db* {dbfs}/"
    )
    broker.restart(database=str(dbfs / "kbs.db"))
    daemon = daemons.start(node)
    daemons.ready(daemon)
    pid = broker.pid
    refused_then_recovered(daemon, node, lambda: fill(pid, dbfs), lambda: unfill(pid, dbfs))
    assert "full" in broker.log()
    assert broker._proc is not None
    assert broker._proc.poll() is None


# --- the node's storage -------------------------------------------------------------------------


def test_key_directory_tmpfs_full(
    broker: Broker, make_node: NodeFactory, tmp_path: Path, daemons: Daemons
) -> None:
    node = granted_node(broker, make_node, tmp_path, "keys-full")
    owned = node.key_dirs[0] / "keylease"
    owned.mkdir(parents=True)
    # one page: the key fits, but a rotated version cannot be written next to it
    daemon = daemons.start(node, private_tmpfs({owned: "size=4k,mode=0700"}))
    daemons.ready(daemon)
    old = files_in(seen_by(daemon.pid, node.key_dirs[0]))["prod-key.v1.pem"]
    new = write_key(tmp_path / "k-v2.pem", rsa.generate_private_key(65537, 2048))
    ok(broker.kbs("key", "rotate", "prod-key", "--private-key", str(new)))
    wait_until(lambda: "No space left on device" in daemon.log(), 30, "the install fails",
               daemon.log())  # fmt: skip
    time.sleep(2)
    dirs = [seen_by(daemon.pid, d) for d in node.key_dirs]
    # the old version, whole; no partial v2 and no temp file
    assert files_in(dirs[0]) == {"prod-key.v1.pem": old}
    assert files_in(dirs[1]) == {"prod-key.v1.pem": old}
    remount(daemon.pid, owned, "size=64k")
    wanted = {"prod-key.v1.pem": old, "prod-key.v2.pem": new.read_bytes()}
    wait_until(lambda: all(files_in(d) == wanted for d in dirs), 30,
               "the new version beside the old once there is room", daemon.log())  # fmt: skip


def test_state_directory_read_only(
    broker: Broker, make_node: NodeFactory, tmp_path: Path, daemons: Daemons
) -> None:
    node = granted_node(broker, make_node, tmp_path, "state-ro")
    assert node.attest().returncode == 0  # keys and a sealed cache
    state = node.root / "state"
    copy = tmp_path / "state-copy"
    shutil.copytree(state, copy)
    daemon = daemons.start(
        node, private_tmpfs({state: "size=2m,mode=0700"}, then=f"cp -a {copy}/. {state}/")
    )
    daemons.ready(daemon)
    remount(daemon.pid, state, "ro")
    cached = (seen_by(daemon.pid, state) / "release.bin").read_bytes()
    import_and_grant(broker, tmp_path, "second")  # CHANGED: a release the cache cannot keep
    wait_until(lambda: "the sealed cache was not updated" in daemon.log(), 30,
               "an attestation that cannot write its cache", daemon.log())  # fmt: skip
    time.sleep(3)  # not retried as a failure, and the keys stay
    assert keys_of(node) == [{"prod-key.v1.pem", "second.v1.pem"}] * 2
    assert "attestation error" not in daemon.log()
    remount(daemon.pid, state, "rw")
    ok(broker.kbs("grant", "remove", "second", "--selector", "cluster=prod"))
    wait_until(lambda: keys_of(node) == [{"prod-key.v1.pem"}] * 2, 30, "the next release",
               daemon.log())  # fmt: skip
    assert (seen_by(daemon.pid, state) / "release.bin").read_bytes() != cached


# --- the TPM ------------------------------------------------------------------------------------


def fill_tpm_objects(tcti: str) -> int:
    """Load primary keys into the TPM until it has no object memory left; leave them there."""
    loader = TCTILdr.parse(tcti)
    esys = ESAPI(loader)
    loaded = 0
    try:
        for _ in range(16):
            try:
                esys.create_primary(
                    TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse("ecc256"), ESYS_TR.OWNER
                )
            except TSS2_Exception as exc:
                if exc.error & 0xFFF != 0x902:  # TPM_RC_OBJECT_MEMORY
                    raise
                return loaded
            loaded += 1
        raise AssertionError("the TPM never ran out of object memory")
    finally:
        esys.close()
        loader.close()


def test_tpm_out_of_object_memory(
    broker: Broker, make_node: NodeFactory, tmp_path: Path, daemons: Daemons
) -> None:
    node = granted_node(broker, make_node, tmp_path, "tpm-full")
    daemon = daemons.start(node)
    daemons.ready(daemon)
    time.sleep(1)  # idle: the agent holds no TPM connection between attempts
    assert fill_tpm_objects(node.tpm.tcti) >= 3
    import_and_grant(broker, tmp_path, "second")
    wait_until(lambda: keys_of(node) == [{"prod-key.v1.pem", "second.v1.pem"}] * 2, 30,
               "an attestation with a full TPM", daemon.log())  # fmt: skip
    assert "transient object(s)/session(s) left in the TPM" in daemon.log()


# --- the agent killed at an exact system call ---------------------------------------------------


def test_agent_killed_mid_install_and_mid_cache_write(
    broker: Broker, make_node: NodeFactory, tmp_path: Path, daemons: Daemons
) -> None:
    node = granted_node(broker, make_node, tmp_path, "kill-exact")
    first = daemons.start(node)
    daemons.ready(first)
    assert first.stop() == 0
    # Killed after the first of two key files is linked into place.
    import_and_grant(broker, tmp_path, "second")
    killed = daemons.start(node, kill_at("linkat", 2))
    assert killed.proc is not None
    assert killed.proc.wait(60) != 0, killed.log()
    published = keys_of(node)  # whole files only, no temp file: one directory has it, one not
    assert sorted(map(sorted, published)) == [
        ["prod-key.v1.pem"],
        ["prod-key.v1.pem", "second.v1.pem"],
    ]
    # Killed as the new sealed cache is renamed into place.
    cache = node.root / "state" / "release.bin"
    cached = cache.read_bytes()
    import_and_grant(broker, tmp_path, "third")
    killed = daemons.start(node, kill_at("rename", 1, node.root / "state" / ".release.bin.tmp"))
    assert killed.proc is not None
    assert killed.proc.wait(60) != 0, killed.log()
    assert cache.read_bytes() == cached  # the old cache, whole
    # Each time the next start recovers by itself: every key, everywhere, and a new cache.
    recovered = daemons.start(node)
    wanted = {"prod-key.v1.pem", "second.v1.pem", "third.v1.pem"}
    wait_until(lambda: keys_of(node) == [wanted] * 2, 60, "every key installed", recovered.log())
    wait_until(lambda: cache.read_bytes() != cached, 10, "a new sealed cache", recovered.log())
    assert not (node.root / "state" / ".release.bin.tmp").exists()


# --- the wall clock -----------------------------------------------------------------------------


def clocked_agent(
    broker: Broker, make_node: NodeFactory, tmp_path: Path, daemons: Daemons, lease: int
) -> tuple[Node, AgentDaemon, JumpingClock]:
    """A granted node whose daemon runs with a wall clock the test can step, keys installed."""
    broker.restart(lease_seconds=lease)
    node = granted_node(broker, make_node, tmp_path, f"clock-{lease}")
    clock = JumpingClock(tmp_path / "clock")
    daemon = daemons.start(node, env=clock.env())
    daemons.ready(daemon)
    return node, daemon, clock


def test_clock_stepped_forward_keeps_keys_for_the_lease_and_renews_once(
    broker: Broker, make_node: NodeFactory, tmp_path: Path, daemons: Daemons
) -> None:
    node, daemon, clock = clocked_agent(broker, make_node, tmp_path, daemons, lease=15)
    settled(broker.directory / "kbs.db", node.name)
    before = attested(daemon)
    clock.jump(+2 * 3600)  # past the lease's not-after, by the node's clock only
    seen: list[list[set[str]]] = []
    for _ in range(150):  # 15 s: a renewal falls inside (at about 2/3 of the lease)
        seen.append(keys_of(node))
        time.sleep(0.1)
    assert all(s == [{"prod-key.v1.pem"}] * 2 for s in seen), daemon.log()  # never missing
    assert attested(daemon) > before, daemon.log()  # renewed meanwhile, still
    delays = [float(d) for d in re.findall(r"renewing in ([0-9.]+) s", daemon.log())]
    assert min(delays) >= 15 * 2 / 3 * 0.8, daemon.log()  # at the lease's pace: no storm
    assert "lease ended" not in daemon.log()


def test_clock_stepped_back_cannot_keep_keys_past_the_lease(
    broker: Broker, make_node: NodeFactory, tmp_path: Path, daemons: Daemons
) -> None:
    node, daemon, clock = clocked_agent(broker, make_node, tmp_path, daemons, lease=12)
    received = time.monotonic()
    broker.stop()  # no renewal from now on
    clock.jump(-50 * 60)  # the lease would last 50 more minutes by the node's clock
    wait_until(lambda: keys_of(node) == [set(), set()], 20, "keys gone at the lease's end",
               daemon.log())  # fmt: skip
    assert time.monotonic() - received < 12 + 2
    assert "lease ended" in daemon.log()

"""Several brokers on one PostgreSQL: the whole path on PostgreSQL, nonces accepted exactly once
by any replica, one identity per node name under enrollment races, a replica killed mid-request,
the database restarted under load (requests fail with UNAVAILABLE, health goes NOT_SERVING, then
both recover by themselves). Real brokers, real swtpms, a real private PostgreSQL cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.blobs import NodeIdentity
from agent.broker import BrokerClient
from agent.enroll import Enrolled, enroll
from agent.errors import (
    AgentError,
    AttestationRefused,
    BrokerBusy,
    BrokerUnreachable,
    NotAuthenticated,
)
from agent.tpm import Tpm
from harness.broker import Broker, pg_broker
from harness.keys import write_key
from harness.nodes import Node
from harness.operator import grant_node, ok
from harness.postgres import PostgresServer, postgres_fixture  # noqa: F401
from harness.swtpm import Swtpm
from kbs.errors import NodeEkConflict, NonceUnknown, StoreError
from kbs.model import NodeState
from kbs.store import Store
from kbs.store.migrate import HEAD_REVISION
from tests.kbs.test_refusals import fresh_quote, session

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T = TypeVar("T")


@dataclass
class Replicas:
    a: Broker
    b: Broker
    url: str

    def store(self) -> Store:
        return Store.open(self.url)

    def releases(self, node: str) -> int:
        with self.store() as store:
            return sum(1 for e in store.list_audit(node=node, limit=10_000) if e.event == "release")


@pytest.fixture
def replicas(postgres: PostgresServer, tmp_path: Path, ek_roots: Path) -> Iterator[Replicas]:
    url = postgres.create_database("replicas")
    a = pg_broker(tmp_path / "kbs-a", ek_roots, url)
    b = pg_broker(tmp_path / "kbs-b", ek_roots, url, like=a)
    a.start()
    b.start()
    try:
        yield Replicas(a, b, url)
    finally:
        a.stop()
        b.stop()


def node_at(broker: Broker, tpm: Swtpm, root: Path, shm_path: Path, name: str) -> Node:
    root.mkdir(exist_ok=True)
    keys = shm_path / root.name
    keys.mkdir(exist_ok=True)
    return Node(name=name, tpm=tpm, root=root, keys_root=keys, broker=broker)


@pytest.fixture
def granted(
    replicas: Replicas, tpm_factory: Callable[..., Swtpm], tmp_path: Path, shm_path: Path
) -> tuple[Node, Node, Enrolled]:
    """One node, enrolled and granted through replica A; the same node seen from A and from B."""
    tpm = tpm_factory()
    at_a = node_at(replicas.a, tpm, tmp_path / "node", shm_path, "worker-1")
    at_b = node_at(replicas.b, tpm, tmp_path / "node", shm_path, "worker-1")
    cfg = at_a.config()
    with session(at_a) as (t, client, state):
        me = enroll(cfg, t, client, state)
        nonce = client.get_nonce(me.identity)
        client.attest(me.identity, nonce, fresh_quote(t, me.ak, nonce), b"")  # pending
    key = write_key(tmp_path / "k.pem", rsa.generate_private_key(65537, 2048))
    grant_node(replicas.a, at_a, key)
    return at_a, at_b, me


def health(broker: Broker, service: str = "") -> str:
    ca = broker.ca.read_bytes()
    with grpc.secure_channel(broker.address, grpc.ssl_channel_credentials(ca)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_for(what: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {why}")
        time.sleep(0.2)


class Attester:
    """Attest ``node`` in a loop from threads (quotes serialised on one TPM connection), getting
    each nonce at one replica and attesting at the other; counts outcomes."""

    def __init__(self, a: Node, b: Node, me: Enrolled) -> None:
        self.a, self.b, self.ak, self.identity = a, b, me.ak, me.identity
        self.ok = 0
        self.errors: list[AgentError] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._tpm_lock = threading.Lock()

    def _patient(self, call: Callable[[], T]) -> T:
        """``call()``, retried after the broker's hint while it answers RESOURCE_EXHAUSTED (a
        throttled call did nothing: the nonce is still unused)."""
        while True:
            try:
                return call()
            except BrokerBusy as exc:
                if self.stop.is_set():
                    raise
                time.sleep(min(exc.retry_after_seconds or 0.2, 1.0))

    def one(self, tpm: Tpm, nonce_at: BrokerClient, attest_at: BrokerClient) -> None:
        """One attestation; a failure is recorded, then the client backs off a little."""
        try:
            nonce = self._patient(lambda: nonce_at.get_nonce(self.identity))
            with self._tpm_lock:
                quote = fresh_quote(tpm, self.ak, nonce)
            reply = self._patient(lambda: attest_at.attest(self.identity, nonce, quote, b""))
        except BrokerBusy:
            return  # stopping
        except AgentError as exc:
            with self.lock:
                self.errors.append(exc)
            time.sleep(0.1)
            return
        assert reply.release is not None
        with self.lock:
            self.ok += 1

    def run(self, threads: int, rounds: int | None = None) -> list[threading.Thread]:
        cfg_a, cfg_b = self.a.config(), self.b.config()
        tpm = Tpm.open(self.a.tpm.tcti)

        def loop(index: int) -> None:
            with BrokerClient(cfg_a) as ca, BrokerClient(cfg_b) as cb:
                pair = (ca, cb) if index % 2 == 0 else (cb, ca)
                done = 0
                while not self.stop.is_set() and (rounds is None or done < rounds):
                    self.one(tpm, *pair)
                    done += 1

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        self._tpm = tpm
        return workers

    def join(self, workers: list[threading.Thread], stop: bool = True) -> None:
        if stop:
            self.stop.set()
        for w in workers:
            w.join(60)
        self._tpm.close()


# --- the whole path on PostgreSQL ------------------------------------------------------------


def test_e2e_happy_path_on_postgresql(
    replicas: Replicas, tpm_factory: Callable[..., Swtpm], tmp_path: Path, shm_path: Path
) -> None:
    node = node_at(replicas.a, tpm_factory(), tmp_path / "n", shm_path, "worker-pg")
    assert node.attest().returncode == 3
    grant_node(
        replicas.a, node, write_key(tmp_path / "k.pem", rsa.generate_private_key(65537, 2048))
    )
    ok(node.attest())
    assert node.key_file("prod-key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    listing = replicas.b.kbs("node", "list")  # the other replica's operator view: same rows
    ok(listing)
    assert "worker-pg" in listing.stdout
    assert "approved" in listing.stdout
    assert replicas.releases("worker-pg") == 1


# --- nonces, attestations and enrollment across replicas -------------------------------------


def test_a_nonce_from_one_replica_is_accepted_once_by_any(
    replicas: Replicas, granted: tuple[Node, Node, Enrolled]
) -> None:
    at_a, at_b, me = granted
    ak = me.ak
    with session(at_a) as (tpm, client_a, _), session(at_b) as (_, client_b, _):
        nonce = client_a.get_nonce(me.identity)
        quote = fresh_quote(tpm, ak, nonce)
        assert client_b.attest(me.identity, nonce, quote, b"").release is not None
        for client in (client_b, client_a):
            with pytest.raises(AttestationRefused, match=r"already used|not issued"):
                client.attest(me.identity, nonce, quote, b"")
    assert replicas.releases(at_a.name) == 1


def test_a_node_enrolled_again_at_one_replica_is_accepted_at_the_other(
    replicas: Replicas, granted: tuple[Node, Node, Enrolled]
) -> None:
    """Replica B cached the node's key; the node enrolls again at A (a new key): B drops the old
    key when the change feed reports the enrollment, and accepts the new one within seconds."""
    at_a, at_b, me = granted
    with session(at_b) as (_, client_b, _):
        client_b.get_nonce(me.identity)  # B has the key cached now
    with session(at_a) as (tpm, client_a, state):
        again = enroll(at_a.config(), tpm, client_a, state)
    assert again.identity.key != me.identity.key

    def accepted(identity: NodeIdentity) -> bool:
        try:
            client_b.get_nonce(identity)
        except NotAuthenticated:
            return False
        return True

    with session(at_b) as (_, client_b, _):
        wait_for(lambda: accepted(again.identity), 3, "the new key accepted at replica B")
        assert not accepted(me.identity)


def test_concurrent_attestations_across_both_replicas(
    replicas: Replicas, granted: tuple[Node, Node, Enrolled]
) -> None:
    at_a, at_b, me = granted
    attester = Attester(at_a, at_b, me)
    attester.join(attester.run(threads=4, rounds=5), stop=False)
    assert attester.errors == []
    assert attester.ok == 20
    assert replicas.releases(at_a.name) == attester.ok


def test_one_nonce_raced_by_many_threads_on_two_stores_is_taken_once(replicas: Replicas) -> None:
    with replicas.store() as one, replicas.store() as two:
        one.enroll_node(name="race", ek_hash="e" * 64, ek_public=b"p", ek_certificate=b"c",
                        ak_public=b"a", state=NodeState.APPROVED, metadata={}, now=T0)  # fmt: skip
        for round_ in range(5):
            nonce = bytes([round_]) * 32
            one.add_nonce("race", nonce, T0 + timedelta(minutes=1))
            barrier = threading.Barrier(8)
            won: list[int] = []
            refused: list[int] = []

            def take(
                i: int,
                nonce: bytes = nonce,
                barrier: threading.Barrier = barrier,
                won: list[int] = won,
                refused: list[int] = refused,
            ) -> None:
                barrier.wait()
                try:
                    (one if i % 2 else two).consume_nonce("race", nonce, T0)
                    won.append(i)
                except NonceUnknown:
                    refused.append(i)

            threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert (len(won), len(refused)) == (1, 7)


@pytest.mark.parametrize("same_ek", [False, True])
def test_enrollment_race_on_one_name_yields_one_node(replicas: Replicas, same_ek: bool) -> None:
    """Many writers through two stores enroll one name at once: with different EKs exactly one
    wins (the rest get NodeEkConflict); with the same EK all succeed on one row."""
    with replicas.store() as one, replicas.store() as two:
        barrier = threading.Barrier(8)
        outcomes: list[str] = []

        def enroll_one(i: int) -> None:
            ek = "f" * 64 if same_ek else f"{i:064x}"
            barrier.wait()
            try:
                (one if i % 2 else two).enroll_node(
                    name="contested", ek_hash=ek, ek_public=b"p", ek_certificate=b"c",
                    ak_public=bytes([i]), state=NodeState.PENDING, metadata={}, now=T0,
                )  # fmt: skip
                outcomes.append("ok")
            except NodeEkConflict:
                outcomes.append("conflict")

        threads = [threading.Thread(target=enroll_one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count("ok") == (8 if same_ek else 1)
        assert [n.name for n in one.list_nodes()] == ["contested"]


def test_two_tpms_enrolling_one_name_at_both_replicas_at_once(
    replicas: Replicas, tpm_factory: Callable[..., Swtpm], tmp_path: Path, shm_path: Path
) -> None:
    nodes = [
        node_at(broker, tpm_factory(distinct=True), tmp_path / f"n{i}", shm_path, "same-name")
        for i, broker in enumerate((replicas.a, replicas.b))
    ]
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def run(node: Node) -> None:
        cfg = node.config()
        with session(node) as (tpm, client, state):
            barrier.wait()
            try:
                enroll(cfg, tpm, client, state)
                outcomes.append("ok")
            except AgentError as exc:
                outcomes.append(type(exc).__name__ + ": " + str(exc))

    threads = [threading.Thread(target=run, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 1, outcomes
    assert any("EnrollmentRefused" in o and "another EK" in o for o in outcomes), outcomes
    with replicas.store() as store:
        assert [n.name for n in store.list_nodes()] == ["same-name"]


# --- failures -----------------------------------------------------------------------------------


def test_a_replica_killed_mid_attestation_leaves_no_half_written_state(
    replicas: Replicas, granted: tuple[Node, Node, Enrolled]
) -> None:
    """Each store call is atomic; a kill between calls leaves a used nonce and at most the audit
    rows of the calls made. Checked: the other replica goes on, no lock is left behind, and every
    release the clients received is in the audit log (plus at most one per request in flight)."""
    at_a, at_b, me = granted
    ak = me.ak
    attester = Attester(at_a, at_b, me)
    workers = attester.run(threads=4)
    wait_for(lambda: attester.ok >= 4, 30, "attestations under way")
    os.kill(replicas.b.pid, signal.SIGKILL)
    time.sleep(0.5)
    attester.join(workers)
    assert all(isinstance(e, BrokerUnreachable) for e in attester.errors), attester.errors
    audited = replicas.releases(at_a.name)
    assert attester.ok <= audited <= attester.ok + 4
    started = time.monotonic()  # no row lock left by the dead replica's sessions
    ok(replicas.a.kbs("node", "approve", at_a.name, "--label", "cluster=prod", "--label",
                      "region=eu"))  # fmt: skip
    assert time.monotonic() - started < 10
    with session(at_a) as (tpm, client, _):
        nonce = client.get_nonce(me.identity)
        assert client.attest(me.identity, nonce, fresh_quote(tpm, ak, nonce), b"").release
    replicas.b.start()  # and the killed replica comes back on the same database
    with session(at_b) as (tpm, client, _):
        nonce = client.get_nonce(me.identity)
        assert client.attest(me.identity, nonce, fresh_quote(tpm, ak, nonce), b"").release


def test_database_restart_under_load(
    replicas: Replicas, granted: tuple[Node, Node, Enrolled], postgres: PostgresServer
) -> None:
    at_a, at_b, me = granted
    assert health(replicas.a) == health(replicas.b) == "SERVING"
    assert health(replicas.a, "keylease.v1.NodeService") == "SERVING"
    attester = Attester(at_a, at_b, me)
    workers = attester.run(threads=2)
    try:
        wait_for(lambda: attester.ok >= 2, 30, "attestations under way")
        postgres.stop("immediate")
        try:
            wait_for(lambda: health(replicas.a) == "NOT_SERVING", 15, "A reports NOT_SERVING")
            wait_for(lambda: health(replicas.b) == "NOT_SERVING", 15, "B reports NOT_SERVING")
            assert health(replicas.a, "keylease.v1.NodeService") == "NOT_SERVING"
            failed = len(attester.errors)
            wait_for(lambda: len(attester.errors) > failed + 2, 20, "requests fail meanwhile")
        finally:
            postgres.start()
        wait_for(lambda: health(replicas.a) == "SERVING", 20, "A SERVING again")
        wait_for(lambda: health(replicas.b) == "SERVING", 20, "B SERVING again")
        done = attester.ok
        wait_for(
            lambda: attester.ok >= done + 4,
            30,
            f"attestations succeed again (last errors: {attester.errors[-3:]})",
        )
    finally:
        attester.join(workers)
    assert attester.errors
    for exc in attester.errors:  # clean failures only: UNAVAILABLE with the reason
        assert isinstance(exc, BrokerUnreachable), exc
        assert "database" in str(exc) or "unavailable" in str(exc), exc
    for broker in (replicas.a, replicas.b):
        assert broker._proc is not None
        assert broker._proc.poll() is None, broker.log()
    postgres.stop("immediate")
    try:
        with pytest.raises(StoreError, match="unavailable"):
            Store.open(replicas.url)
    finally:
        postgres.start()


def test_a_broker_started_before_its_database_waits_for_it(
    postgres: PostgresServer, tmp_path: Path, ek_roots: Path
) -> None:
    url = postgres.create_database("late")
    broker = pg_broker(tmp_path / "kbs-late", ek_roots, url)
    postgres.stop("immediate")
    later = threading.Timer(4.0, postgres.start)
    later.start()
    try:
        broker.start(timeout=60)  # ready only once the database answers
        assert "retrying in" in broker.log(), broker.log()
        assert health(broker) == "SERVING"
        assert broker.kbs("node", "list", "--json").returncode == 0
    finally:
        later.join()
        broker.stop()


def test_replicas_migrating_a_new_database_at_once_migrate_it_once(
    postgres: PostgresServer,
) -> None:
    url = postgres.create_database("migrate_race")
    code = "import sys; from kbs.store import Store; Store.open(sys.argv[1]).close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    with Store.open(url) as store:
        assert store.schema_version() == HEAD_REVISION
        assert store.list_nodes() == []
    engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    finally:
        engine.dispose()

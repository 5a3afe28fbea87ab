"""A running simulated fleet for the fleet benchmark (``scripts.bench_fleet``) and the soak
(``scripts.soak``): brokers (``ek-ca`` enrollment, metrics on), ``clients`` worker processes
(``scripts.fleet_worker``) each with an swtpm carrying its share of ``nodes`` identities, every
node enrolled, approved with the label ``role=bench``, a PCR policy and an RSA-3072 key granted.
Nothing of the set-up is timed; ``Fleet.ask`` drives the workers."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.broker import Broker
from harness.keys import write_key
from harness.netops import metrics_port
from harness.swtpm import Swtpm, SwtpmCa
from scripts.fleet_ca import EkCa
from scripts.fleet_worker import WorkerSpec, node_name, worker_main

__all__ = ["LABEL", "POLICY_PCRS", "Fleet", "running_fleet"]

POLICY_PCRS = "0,1,2,3,4,5,6,7"
LABEL = "role=bench"


@dataclass
class Fleet:
    work: Path
    brokers: list[Broker]
    metrics: list[int]  # each broker's metrics port
    conns: list[Connection] = field(default_factory=list)  # one pipe per worker process
    enrolled: int = 0

    def ask(self, command: str, arg: object = None) -> list[Any]:
        """Send ``(command, arg)`` to every worker; their answers, in order."""
        for conn in self.conns:
            conn.send((command, arg))
        return [conn.recv() for conn in self.conns]


@contextmanager
def running_fleet(
    nodes: int,
    clients: int,
    settings: Mapping[str, int | str],
    *,
    replicas: int = 1,
    broker_cpus: str = "",
    nofile: int | None = None,
) -> Iterator[Fleet]:
    """Brokers with ``settings`` in kbs.toml, and ``nodes`` enrolled, approved and granted."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kl-fleet-") as tmp:
        work = Path(tmp)
        golden = SwtpmCa(work / "swtpm-ca").golden / "tpm2-00.permall"
        ek_ca = EkCa.create()
        roots = work / "roots.pem"
        roots.write_bytes(ek_ca.root_pem())
        brokers = [Broker(work / "kbs0", roots, enrollment="ek-ca", nofile=nofile)]
        for i in range(1, replicas):
            brokers.append(_replica(brokers[0], work / f"kbs{i}", roots))
        tpms: list[Swtpm] = []
        procs: list[Any] = []
        fleet = Fleet(work, brokers, [])
        try:
            for b in brokers:
                b.set(**settings, metrics_listen="127.0.0.1:0")
                b.start()
                if broker_cpus:
                    subprocess.run(["taskset", "-pc", broker_cpus, str(b.pid)], check=True)
            fleet.metrics = [metrics_port(b) for b in brokers]
            for w in range(clients):
                d = work / f"tpm{w}"
                d.mkdir()
                shutil.copyfile(golden, d / "tpm2-00.permall")
                tpm = Swtpm(d)
                tpm.start()
                tpms.append(tpm)
                parent, child = ctx.Pipe()
                spec = WorkerSpec(
                    worker=w,
                    tcti=tpm.tcti,
                    addresses=tuple(b.address for b in brokers),
                    ca_pem=brokers[0].ca.read_bytes(),
                    ek_ca_key_pem=ek_ca.key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                    ek_ca_cert_pem=ek_ca.root_pem(),
                    nodes=tuple(range(w, nodes, clients)),
                )
                proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
                proc.start()
                procs.append(proc)
                fleet.conns.append(parent)
            t0 = time.monotonic()
            enrolled = fleet.ask("enroll")
            fleet.enrolled = sum(n for n, _ in enrolled)
            problems = [e for _, errs in enrolled for e in errs]
            print(f"enrolled {fleet.enrolled}/{nodes} nodes in {time.monotonic() - t0:.1f} s")
            for text in problems[:5]:
                print(f"  enrollment error: {text}")
            if fleet.enrolled:
                # node 0 attests once (denied: no policy yet) so that its PCRs seed the policy
                fleet.conns[0].send(("attest", 0))
                fleet.conns[0].recv()
                t0 = time.monotonic()
                _setup_catalog(brokers[0], work, [node_name(i) for i in range(nodes)])
                print(f"approved, policy, key and grant set up in {time.monotonic() - t0:.1f} s")
            yield fleet
            for conn in fleet.conns:
                conn.send(("stop", None))
        finally:
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
            for tpm in tpms:
                tpm.stop()
            for b in brokers:
                b.stop()


def _replica(first: Broker, directory: Path, ek_roots: Path) -> Broker:
    """Another broker on the same database, TLS identity and master key as ``first``."""
    other = Broker(directory, ek_roots, enrollment="ek-ca")
    for item in ("master.key", "agent-ca.pem", "tls"):
        src, dst = first.directory / item, directory / item
        if src.is_dir():
            shutil.rmtree(dst)
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    return other


def _must(result: Any, what: str) -> None:
    if result.returncode != 0:
        raise SystemExit(f"fleet: {what} failed: {result!r}")


def _setup_catalog(broker: Broker, work: Path, names: list[str]) -> None:
    """Approve every node with the bench label; policy over PCRs 0-7; an RSA-3072 key granted."""
    from kbs.config import load_config
    from kbs.store import Store  # approvals written directly: 10,000 CLI runs take long

    store = Store.open(load_config(broker.config).database)
    try:
        now = datetime.now(UTC)
        for name in names:
            store.approve_node(name, {"role": "bench"}, now)
    finally:
        store.close()
    write_key(work / "k.pem", rsa.generate_private_key(65537, 3072))
    _must(broker.kbs("policy", "set", "p", "--pcrs", POLICY_PCRS, "--from-node", names[0]), "p")
    _must(broker.kbs("policy", "assign", "p", "--selector", LABEL), "policy assign")
    _must(broker.kbs("key", "import", "k", "--private-key", str(work / "k.pem")), "key import")
    _must(broker.kbs("grant", "add", "k", "--selector", LABEL), "grant add")

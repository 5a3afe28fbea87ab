"""Benchmark the broker's CPU to approve an update for a fleet: `policy allow` from a canary, on a
policy covering N nodes (default 10,000), each of which gets its approvals signed for it.

Everything real but the fleet's TPMs: the broker's SQLite store (on /dev/shm by default), its
signing key from `keylease-kbs init`, the committed OVMF boot logs (tests/data/eventlogs: every
node booted the base command line, the canary the changed one). Measured on this process's CPU
(time.process_time), three ways:

1. ``widening_pushes``: find the nodes, predict and evaluate their new states (shared by nodes of
   one boot log), sign two ECDSA P-256 signatures per approval per node;
2. ``put_policy`` with those pushes: one transaction writing the policy, each node's approved
   states and its change row carrying its approvals;
3. the whole ``PolicyAdmin.allow`` as an operator runs it (both, plus reading the canary).

    .venv/bin/python -m scripts.bench_approvals [--nodes 10000] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from harness.broker import Broker
from harness.swtpm import SwtpmCa
from kbs.admin.policies import PolicyAdmin
from kbs.approvals.widen import Canary, widening_pushes
from kbs.config import load_config
from kbs.model import NodeState
from kbs.policy import learn
from kbs.signing import load_signing_keys
from kbs.store import BootUpdate, ReleaseBinding, Store
from keylease.api.v1.approvals import decode_approvals
from keylease.eventlog import analyse

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "eventlogs"


def _boot(name: str) -> tuple[BootUpdate, dict[int, bytes]]:
    log = DATA / f"ovmf-{name}.bin"
    meta = json.loads(log.with_suffix(".json").read_text())
    quoted = {int(i): bytes.fromhex(v) for i, v in meta["pcrs"]["sha256"].items()}
    data = log.read_bytes()
    state = analyse(data).states["sha256"]
    return BootUpdate(hashlib.sha256(data).hexdigest(), {"sha256": state}), quoted


def _node(store: Store, name: str, boot: BootUpdate, quoted: dict[int, bytes], fp: str,
          now: datetime) -> None:  # fmt: skip
    store.enroll_node(
        name=name, ek_hash=hashlib.sha256(name.encode()).hexdigest(), ek_public=b"ek",
        ek_certificate=b"cert", ak_public=b"ak", state=NodeState.APPROVED, metadata={}, now=now,
    )  # fmt: skip
    store.approve_node(name, {"role": "vm"}, now)
    store.record_attestation(
        name, banks={"sha256": quoted}, reset_count=1, restart_count=0, now=now, boot=boot,
        binding=ReleaseBinding(3_600_000, "vm-boot", fp),
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))  # noqa: S108 (tmpfs)
    args = parser.parse_args()
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="kl-bench-approvals-", dir=args.dir) as tmp:
        work = Path(tmp)
        ca = SwtpmCa(work / "ca")
        (work / "roots.pem").write_bytes(ca.bundle_pem())
        broker = Broker(work / "kbs", work / "roots.pem")
        keys = load_signing_keys(load_config(broker.config))
        fp = keys.current.fingerprint
        base, base_pcrs = _boot("base")
        changed, changed_pcrs = _boot("cmdline")
        with Store.open(work / "kbs.db") as store:
            t0 = time.monotonic()
            for n in range(args.nodes):
                _node(store, f"node-{n:05d}", base, base_pcrs, fp, now)
            _node(store, "canary", changed, changed_pcrs, fp, now)
            print(f"set-up: {args.nodes} nodes + canary in {time.monotonic() - t0:.0f} s")
            first = store.get_node("node-00000")
            assert first is not None
            document = learn.learn(first, store.boot_record(first.name), "sha256", None, now)
            store.put_policy("vm-boot", document, now, [{"role": "vm"}])
            before = store.get_policy("vm-boot")
            canary = store.get_node("canary")
            assert canary is not None
            after_doc = learn.allow(
                before, canary, store.boot_record("canary"), ["kernel-cmdline"], now
            )
            after = type(before)(before.name, after_doc, before.selectors)
            witness = Canary(canary, store.boot_record("canary"))
            c0, w0 = time.process_time(), time.monotonic()
            pushes = widening_pushes(store, keys, before, after, witness, now)
            c1, w1 = time.process_time(), time.monotonic()
            approvals = sum(len(decode_approvals(p.payload, ValueError)) for p in pushes.values())
            print(
                f"1. widening_pushes: {len(pushes)} nodes, {approvals} approvals: "
                f"{c1 - c0:.2f} s CPU ({(c1 - c0) / len(pushes) * 1e3:.3f} ms per node), "
                f"{w1 - w0:.2f} s wall"
            )
            c0, w0 = time.process_time(), time.monotonic()
            store.put_policy("vm-boot-copy", after_doc, now, [{"role": "none"}], pushes)
            c1, w1 = time.process_time(), time.monotonic()
            print(f"2. put_policy with the pushes: {c1 - c0:.2f} s CPU, {w1 - w0:.2f} s wall")
            admin = PolicyAdmin(store, "operator:bench", lambda: now, lambda: keys)
            c0, w0 = time.process_time(), time.monotonic()
            change = admin.allow("vm-boot", "canary", ["kernel-cmdline"])
            c1, w1 = time.process_time(), time.monotonic()
            assert change.changes, "the policy did not widen"
            print(
                f"3. policy allow (whole): {c1 - c0:.2f} s CPU, {w1 - w0:.2f} s wall "
                f"for {args.nodes} nodes"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

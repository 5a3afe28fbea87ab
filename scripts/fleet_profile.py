"""Where the broker's CPU goes in one attestation, measured in-process (no gRPC, no TLS).

A broker directory is initialised (``keylease-kbs init``, SQLite or ``--database``) but not
served: ``kbs.enrollment``/``kbs.nonces``/``kbs.attest`` run in this process against the real
store with quotes from a real swtpm (``scripts.fleet_tpm``; distinct EKs). Prints the CPU time
(``process_time``) of ``issue_nonce`` and ``attest`` per call, the part spent in TPM-object work
(quote verification + sealed release: kbs/quote.py, kbs/release.py, kbs/tpm/) without the
store, and with ``--cprofile`` the top functions.

    .venv/bin/python -m scripts.fleet_profile [--runs 400] [--cprofile] [--sqlite-dir /dev/shm]
        [--event-log tests/data/eventlogs/ovmf-base.bin]

With ``--event-log`` the swtpm's PCRs are first extended with that log's events (read by
``tpm2_eventlog``), every attestation sends the log, and the policy is learned from it
(``policy learn``: named components) instead of PCRs 0-7; ``attest`` is then timed twice: as
renewals (the log's analysis is cached by its digest) and with the cache emptied before every
call (each attestation parses, replays and reads the log anew).

The figure for the whole broker (gRPC, TLS, asyncio included) is ``scripts.bench_fleet``'s
"broker CPU per attestation".
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from harness.broker import Broker
from harness.eventlog import extend_tpm, oracle_events
from harness.keys import write_key
from harness.swtpm import Swtpm, SwtpmCa
from kbs import attest as at
from kbs import enrollment
from kbs.config import load_config
from kbs.context import BrokerContext
from kbs.errors import KbsError
from kbs.nonces import issue_nonce
from kbs.quote import verify_quote
from kbs.release import GrantedKey, build_release
from kbs.tpm.objects import parse_public
from keylease.api.v1 import qualifying_data
from keylease.api.v1.tpmpolicy import sealed_auth_policy
from keylease.secret import Secret
from scripts.fleet_ca import EkCa
from scripts.fleet_tpm import FleetTpm

NODES = 20
POLICY = tuple(range(8))


def _setup(ctx: BrokerContext, broker: Broker, tpm: FleetTpm, ca: EkCa) -> dict[str, bytes]:
    contexts: dict[str, bytes] = {}
    for i in range(NODES):
        ident = tpm.create_identity(i)
        ek = parse_public(ident.ek_public, "ek")
        assert isinstance(ek.key, ec.EllipticCurvePublicKey)
        cert = ca.issue_ek_cert(ek.key, i + 1)
        name = f"n{i}"
        req = enrollment.EnrollmentRequest(name, cert, ident.ek_public, ident.ak_public)
        challenge = enrollment.start(ctx, req)
        secret, contexts[name] = tpm.activate(
            ident, challenge.credential_blob, challenge.encrypted_secret
        )
        enrollment.finish(ctx, challenge.enrollment_id, secret)
        ctx.store.approve_node(name, {"role": "bench"}, datetime.now(UTC))
    return contexts


def _catalog(broker: Broker, work: Path, components: bool) -> None:
    write_key(work / "k.pem", rsa.generate_private_key(65537, 3072))
    pcrs = ",".join(map(str, POLICY))
    policy = ("policy", "learn", "p", "--from-node", "n0") if components else (
        "policy", "set", "p", "--pcrs", pcrs, "--from-node", "n0"
    )  # fmt: skip
    for argv in (
        policy,
        ("policy", "assign", "p", "--selector", "role=bench"),
        ("key", "import", "k", "--private-key", str(work / "k.pem")),
        ("grant", "add", "k", "--selector", "role=bench"),
    ):
        result = broker.kbs(*argv)
        if result.returncode != 0:
            raise SystemExit(f"profile: {' '.join(argv)} failed: {result!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=400)
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--sqlite-dir", default="")
    p.add_argument("--database", default="")
    p.add_argument("--event-log", type=Path, help="a boot event log every node sends")
    args = p.parse_args()
    log = args.event_log.read_bytes() if args.event_log else b""
    os.environ.setdefault("TSS2_LOG", "esys+none")
    with tempfile.TemporaryDirectory(prefix="kl-prof-") as tmp:
        work = Path(tmp)
        golden = SwtpmCa(work / "ca").golden / "tpm2-00.permall"
        ca = EkCa.create()
        (work / "roots.pem").write_bytes(ca.root_pem())
        broker = Broker(work / "kbs", work / "roots.pem", enrollment="ek-ca")
        if args.database:
            broker.set(database=args.database)
        elif args.sqlite_dir:
            broker.set(database=str(Path(tempfile.mkdtemp(dir=args.sqlite_dir)) / "kbs.db"))
        ctx = BrokerContext.load(load_config(broker.config))
        (work / "tpm").mkdir()
        (work / "tpm" / "tpm2-00.permall").write_bytes(golden.read_bytes())
        with Swtpm(work / "tpm") as sw:
            if args.event_log:
                extend_tpm(sw.tcti, oracle_events(args.event_log))
            tpm = FleetTpm(sw.tcti)
            contexts = _setup(ctx, broker, tpm, ca)

            def evidence(name: str) -> at.Evidence:
                nonce, _ = issue_nonce(ctx, name)
                quote, sig = tpm.quote(contexts[name], qualifying_data(nonce))
                return at.Evidence(name, nonce, quote, sig, {"sha256": tpm.pcrs()}, log)

            # records n0's PCRs for `policy set --from-node`; denied: no policy yet
            with contextlib.suppress(KbsError):
                at.attest(ctx, evidence("n0"))
            _catalog(broker, work, components=bool(log))
            names = [f"n{i % NODES}" for i in range(args.runs)]
            c0 = time.process_time()
            for name in names:
                issue_nonce(ctx, name)
            nonce_cpu = (time.process_time() - c0) / len(names)
            evs = [evidence(name) for name in names]
            cold = [evidence(name) for name in names[: len(names) // 2]] if log else []
            tpm.close()
        half = len(evs) // 2
        c0 = time.process_time()
        for ev in evs[:half]:
            at.attest(ctx, ev)
        attest_cpu = (time.process_time() - c0) / half
        tpm_cpu = _tpm_object_work(ctx, evs[:half])
        what = f"{len(log)}-byte event log, component policy" if log else "no event log"
        print(f"in-process, {half} attestations of {NODES} nodes (distinct EKs), {what}:")
        print(f"  issue_nonce {nonce_cpu * 1000:.3f} ms (nonce insert, node check inside it)")
        print(f"  attest      {attest_cpu * 1000:.3f} ms (store + verification + release)")
        if cold:
            spent = 0.0
            for ev in cold:
                ctx.event_logs.clear()
                c0 = time.process_time()
                at.attest(ctx, ev)
                spent += time.process_time() - c0
            print(f"  attest      {spent / len(cold) * 1000:.3f} ms with the log analysed anew "
                  "each time (cache emptied)")  # fmt: skip
        print(f"    of which TPM-object work (no store) {tpm_cpu * 1000:.3f} ms")
        if args.cprofile:
            prof = cProfile.Profile(time.process_time)  # CPU time, not waits
            prof.enable()
            for ev in evs[half:]:
                at.attest(ctx, ev)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        ctx.store.close()
    return 0


def _tpm_object_work(ctx: BrokerContext, evs: list[at.Evidence]) -> float:
    """CPU per attestation of parse + verify_quote + build_release alone (already-used nonces)."""
    nodes = {ev.node_name: ctx.store.get_node(ev.node_name) for ev in evs}
    pem = Secret(b"-" * 2500)  # an RSA-3072 PKCS#8 PEM is about this long
    now = datetime.now(UTC)
    c0 = time.process_time()
    for ev in evs:
        node = nodes[ev.node_name]
        assert node is not None
        ak = parse_public(node.ak_public, "ak")
        ek = parse_public(node.ek_public, "ek")
        quote = verify_quote(
            ak,
            ev.quote,
            ev.signature,
            qualifying_data(ev.nonce),
            ev.banks,
            required={"sha256": set(POLICY)},
            ek=ek,
        )
        build_release(
            node_name=ev.node_name,
            ek=ek,
            auth_policy=sealed_auth_policy(ctx.signer.public_key, ev.node_name, "p"),
            policy_group="p",
            pcr_bank="sha256",
            pcr_indices=POLICY,
            approvals=(),
            keys=[GrantedKey("k", 1, pem)],
            issued_at=now,
            not_after=now + timedelta(hours=1),
            lease_clock_limit=quote.clock + 3_600_000,
            signer=ctx.signer,
        )
    return (time.process_time() - c0) / len(evs)


if __name__ == "__main__":
    sys.exit(main())

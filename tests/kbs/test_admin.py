"""The admin API against a real broker subprocess over real mutual TLS: who is refused (no client
certificate, another CA, the broker's own server certificate, a certificate without the admin
marker, an expired or revoked admin certificate), what a valid admin certificate can do, that the
audit log names the operator, that remote and local output match, and that the node listener
knows nothing of admin certificates. Revocations through the shared database: two replicas on a
real PostgreSQL (a revocation on one is refused on the other at once, its file untouched), and
the check failing closed while the database is down. Then a master-key rotation under a running
broker while a real swtpm node keeps attesting."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness.broker import KBS as KBS_BIN
from harness.broker import Broker, CliResult, pg_broker, run
from harness.keys import write_key
from harness.nodes import Node
from harness.operator import grant_node, ok
from harness.postgres import PostgresServer, postgres_fixture  # noqa: F401
from kbs.admin.certs import issue_admin_cert
from kbs.cli import main
from kbs.config import load_config
from kbs.model import NodeState
from kbs.store import AdminRevocation, AuditEvent, Store
from keylease.api.v1 import admin_pb2, admin_pb2_grpc, keylease_pb2, keylease_pb2_grpc

PEM = serialization.Encoding.PEM


def admin_address(broker: Broker) -> str:
    found = re.search(r"admin API \(mutual TLS\) on (\S+:\d+)", broker.log())
    assert found, broker.log()
    return found.group(1)


def remote(broker: Broker, cert_dir: Path, *args: str) -> CliResult:
    return run([KBS_BIN, "--server", admin_address(broker), "--admin-cert", str(cert_dir), *args])


def issue(broker: Broker, name: str, out: Path) -> Path:
    ok(broker.kbs("admin-cert", "issue", name, "--out", str(out)))
    return out


def raw_stub(broker: Broker, cert_dir: Path | None) -> admin_pb2_grpc.AdminServiceStub:
    """A client without the CLI's own checks (e.g. it would refuse an expired certificate)."""
    ca = (broker.directory / "tls" / "ca.pem").read_bytes()
    if cert_dir is None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(cert_dir / "admin-key.pem").read_bytes(),
            certificate_chain=(cert_dir / "admin.pem").read_bytes(),
        )
    return admin_pb2_grpc.AdminServiceStub(grpc.secure_channel(admin_address(broker), creds))


def refusal(stub: admin_pb2_grpc.AdminServiceStub) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListNodes(admin_pb2.AdminEmpty(), timeout=10)
    code: grpc.StatusCode = caught.value.code()
    details: str = caught.value.details() or ""
    return code, details


def refused_code(stub: admin_pb2_grpc.AdminServiceStub) -> grpc.StatusCode:
    return refusal(stub)[0]


def cert_states(broker: Broker) -> list[tuple[str, str]]:
    listing = broker.kbs("admin-cert", "list", "--json")
    ok(listing)
    return [(c["name"], c["state"]) for c in json.loads(listing.stdout)]


def write_client_cert(
    out: Path, ca_dir: Path, subject: x509.Name, eku: list[x509.ObjectIdentifier]
) -> Path:
    """A client certificate signed by the broker's CA, made by hand (not by `admin-cert`)."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir()
    (out / "admin.pem").write_bytes(cert.public_bytes(PEM))
    (out / "admin-key.pem").write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (out / "admin-key.pem").chmod(0o600)
    (out / "ca.pem").write_bytes((ca_dir / "ca.pem").read_bytes())
    return out


def add_nodes(broker: Broker) -> None:
    with Store.open(load_config(broker.config).database) as store:
        for i, name in enumerate(("w1", "w2")):
            store.enroll_node(name=name, ek_hash=f"{i:064x}", ek_public=b"ek",
                              ek_certificate=b"cert", ak_public=b"ak", state=NodeState.PENDING,
                              metadata={"os": "debian"}, now=dt.datetime.now(dt.UTC))  # fmt: skip
        pcrs = {i: bytes([i]) * 32 for i in range(8)}
        store.record_attestation("w1", banks={"sha256": pcrs}, reset_count=3, restart_count=0,
                                 now=dt.datetime.now(dt.UTC))  # fmt: skip


@pytest.fixture
def admin_broker(tmp_path: Path, ek_roots: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "kbs", ek_roots) as running:
        yield running


def test_refused_credentials(admin_broker: Broker, tmp_path: Path, ek_roots: Path) -> None:
    broker = admin_broker
    tls = broker.directory / "tls"
    # no client certificate: the TLS handshake itself fails
    assert refused_code(raw_stub(broker, None)) is grpc.StatusCode.UNAVAILABLE
    # an admin certificate from another broker's CA
    other = Broker(tmp_path / "other", ek_roots)
    foreign = issue(other, "alice", tmp_path / "foreign")
    result = remote(broker, foreign, "node", "list")
    assert result.returncode == 1, result
    assert "issued by this broker's CA" in result.stderr
    # the broker's own server certificate (EKU serverAuth, no admin marker)
    server = tmp_path / "server-cert"
    server.mkdir()
    (server / "admin.pem").write_bytes((tls / "server.pem").read_bytes())
    (server / "admin-key.pem").write_bytes((tls / "server-key.pem").read_bytes())
    (server / "admin-key.pem").chmod(0o600)
    (server / "ca.pem").write_bytes((tls / "ca.pem").read_bytes())
    assert remote(broker, server, "node", "list").returncode != 0
    # a clientAuth certificate from the right CA but without OU=keylease-admin
    plain = write_client_cert(
        tmp_path / "plain", tls, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]),
        [ExtendedKeyUsageOID.CLIENT_AUTH],
    )  # fmt: skip
    result = remote(broker, plain, "node", "list")
    assert result.returncode == 2, result
    assert "not an admin certificate" in result.stderr
    # an expired admin certificate (issued and listed by `admin-cert`, but 10 days ago for 1 day)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    expired = tmp_path / "expired"
    issue_admin_cert(load_config(broker.config), "old", 1, expired, past)
    result = remote(broker, expired, "node", "list")
    assert result.returncode == 2, result
    assert "expired" in result.stderr
    assert refused_code(raw_stub(broker, expired)) is grpc.StatusCode.UNAVAILABLE
    # none of it reached the database
    assert "operator:" not in broker.kbs("audit").stdout.replace("operator:root", "")
    assert re.search(r"refused: .*not an admin certificate", broker.log())


def test_valid_certificate_works_and_revocation_is_immediate(
    admin_broker: Broker, tmp_path: Path
) -> None:
    broker = admin_broker
    add_nodes(broker)
    alice = issue(broker, "alice", tmp_path / "alice")
    key = write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP384R1()))
    ok(remote(broker, alice, "node", "list"))
    ok(remote(broker, alice, "node", "approve", "w1", "--label", "cluster=prod"))
    ok(remote(broker, alice, "key", "import", "img", "--private-key", str(key)))
    ok(remote(broker, alice, "grant", "add", "img", "--selector", "cluster=prod"))
    ok(remote(broker, alice, "allowlist", "add", "ab" * 32))
    ok(remote(broker, alice, "policy", "set", "boot", "--pcrs", "0,7", "--from-node", "w1"))
    ok(remote(broker, alice, "policy", "assign", "boot", "--selector", "cluster=prod"))
    unknown = remote(broker, alice, "node", "approve", "nope")
    assert unknown.returncode == 2
    assert "no node named 'nope'" in unknown.stderr
    bad = remote(broker, alice, "grant", "add", "img", "--selector", "cluster=prod")
    assert bad.returncode == 2, bad
    audit = json.loads(remote(broker, alice, "audit", "--json").stdout)
    mine = [(e["actor"], e["event"]) for e in audit if e["actor"] == "operator:alice"]
    assert mine == [
        ("operator:alice", "approve"),
        ("operator:alice", "key-import"),
        ("operator:alice", "grant-add"),
        ("operator:alice", "allowlist-add"),
        ("operator:alice", "policy-set"),
        ("operator:alice", "policy-assign"),
    ]
    # revoke without restarting the broker: refused at once, and `list` shows it
    ok(broker.kbs("admin-cert", "revoke", "alice"))
    result = remote(broker, alice, "node", "list")
    assert result.returncode == 2, result
    assert "revoked" in result.stderr
    assert cert_states(broker) == [("alice", "revoked")]
    with Store.open(load_config(broker.config).database) as store:
        assert [r.name for r in store.list_admin_revocations()] == ["alice"]
    # a new certificate for the same operator works
    ok(remote(broker, issue(broker, "alice", tmp_path / "alice2"), "key", "list"))
    assert broker.kbs("admin-cert", "revoke", "nobody").returncode == 2
    # revoking again is harmless and revokes the new certificate too
    ok(broker.kbs("admin-cert", "revoke", "alice"))
    assert cert_states(broker) == [("alice", "revoked"), ("alice", "revoked")]
    assert "revoked" in remote(broker, tmp_path / "alice2", "key", "list").stderr


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store on SQLite, then on a new PostgreSQL database."""
    target: Path | str = tmp_path / "kbs.db"
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        target = server.create_database()
    with Store.open(target) as opened:
        yield opened


def test_admin_revocations_in_the_store_are_idempotent(any_store: Store) -> None:
    store = any_store
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    audit = AuditEvent("operator:root", "admin-cert-revoke", None, "ok", "x")
    assert store.admin_revocation("ab12") is None
    first = [AdminRevocation("ab12", "alice", t0), AdminRevocation("cd34", "alice", t0)]
    assert store.add_admin_revocations(first, audit, t0) == ["ab12", "cd34"]
    later = t0 + dt.timedelta(hours=1)
    again = [AdminRevocation("ab12", "alice", later), AdminRevocation("ef56", "bob", later)]
    assert store.add_admin_revocations(again, audit, later) == ["ef56"]
    assert store.admin_revocation("ab12") == AdminRevocation("ab12", "alice", t0)  # first kept
    assert [(r.serial, r.name) for r in store.list_admin_revocations()] == [
        ("ab12", "alice"), ("cd34", "alice"), ("ef56", "bob")
    ]  # fmt: skip
    assert [e.event for e in store.list_audit()] == ["admin-cert-revoke"] * 2


def test_revocation_on_one_replica_is_refused_on_the_other_at_once(
    postgres: PostgresServer, tmp_path: Path, ek_roots: Path
) -> None:
    """Regression: revocations lived only in each host's admin-certs.json, so a certificate
    revoked on replica A kept working on replica B until someone copied the file (fail-open)."""
    url = postgres.create_database("admin")
    a = pg_broker(tmp_path / "kbs-a", ek_roots, url)
    b = pg_broker(tmp_path / "kbs-b", ek_roots, url, like=a)
    a.start()
    b.start()
    try:
        alice = issue(a, "alice", tmp_path / "alice")
        bob = issue(a, "bob", tmp_path / "bob")
        # the operator distributes the list of issued certificates, as with tls/ and the key
        shutil.copy2(a.directory / "admin-certs.json", b.directory / "admin-certs.json")
        for broker in (a, b):
            ok(remote(broker, alice, "node", "list"))
        b_file = (b.directory / "admin-certs.json").read_bytes()
        ok(a.kbs("admin-cert", "revoke", "alice"))
        assert (b.directory / "admin-certs.json").read_bytes() == b_file  # B's copy is stale
        for broker in (b, a):
            result = remote(broker, alice, "node", "list")
            assert result.returncode == 2, result
            assert "revoked" in result.stderr
        code, details = refusal(raw_stub(b, alice))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert "'alice'" in details
        assert "revoked" in details
        ok(remote(b, bob, "node", "list"))  # other operators are unaffected
        assert cert_states(b) == [("alice", "revoked"), ("bob", "valid")]  # seen from B too
        audit = json.loads(remote(b, bob, "audit", "--json").stdout)
        assert [e["event"] for e in audit].count("admin-cert-revoke") == 1
        assert re.search(r"admin ListNodes refused: .*'alice'.* revoked at", b.log())
    finally:
        a.stop()
        b.stop()


def test_admin_rpcs_fail_closed_while_the_database_is_down(
    postgres: PostgresServer, tmp_path: Path, ek_roots: Path
) -> None:
    """The revocation check cannot read the database: refused (UNAVAILABLE, naming it), never
    allowed on the file alone. A revoke then fails loudly, revokes in the file only, and
    completes when run again."""
    url = postgres.create_database("admin_down")
    broker = pg_broker(tmp_path / "kbs", ek_roots, url)
    broker.start()
    try:
        alice = issue(broker, "alice", tmp_path / "alice")
        ok(remote(broker, alice, "node", "list"))
        postgres.stop("immediate")
        try:
            code, details = refusal(raw_stub(broker, alice))
            assert code is grpc.StatusCode.UNAVAILABLE
            assert "cannot check the revocations in the database" in details
            assert "database postgresql://postgres@/admin_down" in details
            result = remote(broker, alice, "node", "list")
            assert result.returncode == 1, result
            assert "cannot check the revocations" in result.stderr
            revoke = broker.kbs("admin-cert", "revoke", "alice")
            assert revoke.returncode == 1, revoke
            assert "revoked in admin_certs" in revoke.stderr
            assert "the database could not be written" in revoke.stderr
            assert "`keylease-kbs admin-cert revoke alice` again" in revoke.stderr
        finally:
            postgres.start()
        assert len(re.findall(r"admin ListNodes by operator:alice", broker.log())) == 1
        # the file revocation holds on this host; `list` shows it is not shared yet
        assert "revoked" in remote(broker, alice, "node", "list").stderr
        assert cert_states(broker) == [("alice", "revoked-locally")]
        assert "revoked-locally" in broker.kbs("admin-cert", "list").stdout
        ok(broker.kbs("admin-cert", "revoke", "alice"))  # run again: now in the database too
        assert cert_states(broker) == [("alice", "revoked")]
    finally:
        broker.stop()


def test_remote_and_local_outputs_match(admin_broker: Broker, tmp_path: Path) -> None:
    broker = admin_broker
    add_nodes(broker)
    alice = issue(broker, "alice", tmp_path / "alice")
    key = write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()))
    ok(broker.kbs("node", "approve", "w1", "--label", "cluster=prod", "--label", "zone=a"))
    ok(broker.kbs("key", "import", "img", "--private-key", str(key)))
    ok(broker.kbs("grant", "add", "img", "--selector", "cluster=prod"))
    ok(broker.kbs("policy", "set", "boot", "--pcrs", "0,1,7", "--from-node", "w1"))
    ok(broker.kbs("policy", "assign", "boot", "--selector", "zone=a"))
    ok(broker.kbs("allowlist", "add", "cd" * 32))
    for n in (2, 3):  # key versions: rotated and retired remotely, listed and shown both ways
        new_key = write_key(tmp_path / f"k{n}.pem", ec.generate_private_key(ec.SECP384R1()))
        ok(remote(broker, alice, "key", "rotate", "img", "--private-key", str(new_key)))
    with Store.open(load_config(broker.config).database) as store:
        now = dt.datetime.now(dt.UTC)
        store.record_attestation("w1", banks={"sha256": {}}, reset_count=3, restart_count=0,
                                 now=now, held=[("img", 1), ("img", 2), ("img", 3)],
                                 lease_until=now + dt.timedelta(hours=1))  # fmt: skip
    refused = remote(broker, alice, "key", "retire", "img", "--version", "3")
    assert refused.returncode == 2
    assert "rotate first" in refused.stderr
    retired = remote(broker, alice, "key", "retire", "img", "--version", "1")
    ok(retired)
    assert "1 node(s) told to attest again" in retired.stdout
    shown = json.loads(remote(broker, alice, "key", "show", "img", "--json").stdout)
    assert [v["state"] for v in shown["versions"]] == ["retired", "active", "current"]
    assert [(h["node"], h["versions"]) for h in shown["holders"]] == [("w1", [1, 2, 3])]
    for argv in (
        ["node", "list"], ["node", "list", "--json"], ["node", "show", "w1"],
        ["node", "show", "w1", "--json"], ["node", "show", "w2"], ["key", "list"],
        ["key", "list", "--json"], ["key", "show", "img"], ["key", "show", "img", "--json"],
        ["grant", "list"], ["grant", "list", "--json"],
        ["policy", "list"], ["policy", "list", "--json"], ["allowlist", "list", "--json"],
        ["policy", "show", "boot"], ["policy", "show", "boot", "--json"],
        ["policy", "export", "boot"], ["policy", "diff", "boot", "--node", "w1", "--json"],
        ["audit"], ["audit", "--json", "--node", "w1", "--limit", "2"],
    ):  # fmt: skip
        local, far = broker.kbs(*argv), remote(broker, alice, *argv)
        ok(local)
        assert far.stdout == local.stdout, argv


def test_node_listener_ignores_admin_certificates(admin_broker: Broker, tmp_path: Path) -> None:
    """The node listener asks for no client certificate: one presented changes nothing (a node
    call still needs the node's own MAC), and the admin service is not served there at all."""
    broker = admin_broker
    alice = issue(broker, "alice", tmp_path / "alice")
    creds = grpc.ssl_channel_credentials(
        root_certificates=(broker.directory / "tls" / "ca.pem").read_bytes(),
        private_key=(alice / "admin-key.pem").read_bytes(),
        certificate_chain=(alice / "admin.pem").read_bytes(),
    )
    channel = grpc.secure_channel(broker.address, creds)
    with pytest.raises(grpc.RpcError) as caught:
        admin_pb2_grpc.AdminServiceStub(channel).ListNodes(admin_pb2.AdminEmpty(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as caught:
        keylease_pb2_grpc.NodeServiceStub(channel).GetNonce(
            keylease_pb2.GetNonceRequest(node_name="alice"), timeout=10
        )
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_remote_refuses_local_only_commands_and_half_targets(tmp_path: Path) -> None:
    assert main(["--server", "127.0.0.1:1", "--admin-cert", str(tmp_path), "serve"]) == 2
    assert main(["--server", "127.0.0.1:1", "master-key", "status"]) == 2
    assert main(["--server", "127.0.0.1:1", "node", "list"]) == 2  # no --admin-cert
    profiles = tmp_path / "kbs-client.toml"
    profiles.write_text('[profile.prod]\nserver = "127.0.0.1:1"\n')
    assert main(["--profile", "prod", "node", "list"]) == 2


def test_profile_file(
    admin_broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = admin_broker
    issue(broker, "alice", tmp_path / "alice")
    home = tmp_path / "xdg"
    (home / "keylease").mkdir(parents=True)
    (home / "keylease" / "kbs-client.toml").write_text(
        f'[profile.prod]\nserver = "{admin_address(broker)}"\nadmin_cert = "../../alice"\n'
    )
    result = run([KBS_BIN, "--profile", "prod", "key", "list"], env={"XDG_CONFIG_HOME": str(home)})
    ok(result)
    assert result.stdout.startswith("NAME")
    missing = run([KBS_BIN, "--profile", "dev", "key", "list"], env={"XDG_CONFIG_HOME": str(home)})
    assert missing.returncode == 2
    assert "[profile.dev]" in missing.stderr


NodeFactory = Callable[..., Node]


def test_master_key_rotation_under_a_running_broker(
    broker: Broker, make_node: NodeFactory, tmp_path: Path
) -> None:
    """Re-encryption happens while the broker serves and a node keeps attesting: every
    attestation before, during and after releases the keys; afterwards the old key can leave the
    config, and a restarted broker holding only the new key still releases."""
    node = make_node("worker-1")
    assert node.attest().returncode == 3
    grant_node(
        broker, node, write_key(tmp_path / "k0.pem", ec.generate_private_key(ec.SECP256R1()))
    )
    for i in range(1, 12):  # more rows, so the rotation takes a while
        name = f"extra-{i}"
        key = write_key(tmp_path / f"{name}.pem", ec.generate_private_key(ec.SECP256R1()))
        ok(broker.kbs("key", "import", name, "--private-key", str(key)))
        ok(broker.kbs("grant", "add", name, "--selector", "cluster=prod"))
    ok(node.attest())
    results: list[CliResult] = []
    stop = threading.Event()

    def attest_loop() -> None:
        while not stop.is_set():
            results.append(node.attest())

    worker = threading.Thread(target=attest_loop)
    worker.start()
    try:
        while not results:
            stop.wait(0.05)
        rotated = broker.kbs("master-key", "rotate", "--generate")
        before = len(results)
        while len(results) < before + 2:
            stop.wait(0.05)
    finally:
        stop.set()
        worker.join()
    ok(rotated)
    assert "re-encrypted 12 key version(s)" in rotated.stdout
    assert all(r.returncode == 0 for r in results), [r for r in results if r.returncode][:1]
    status = broker.kbs("master-key", "status").stdout.splitlines()
    assert re.search(r"current\s+12$", status[1])
    assert re.search(r"previous\s+0$", status[2])
    text = broker.config.read_text()
    broker.config.write_text(re.sub(r"(?m)^previous_master_keys = .*$", "", text))
    ok(node.attest())  # the running broker already holds the new key
    broker.restart()
    ok(node.attest())
    assert node.key_file("extra-11").exists()

"""The whole path through the two CLIs: enroll, approve, policy, key, grant, attest, install,
then skopeo decrypts a real encrypted image with the installed key; a tampered boot is denied."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.tpm import Tpm
from harness.broker import Broker
from harness.keys import write_key
from harness.netops import metrics_port, scrape
from harness.nodes import Node
from harness.oci import make_oci_image, read_file_from_image, skopeo_decrypt, skopeo_encrypt
from harness.operator import grant_node, ok
from kbs.store import Store

NodeFactory = Callable[..., Node]


def test_release_install_decrypt_then_tampered_boot(
    broker: Broker, make_node: NodeFactory, tmp_path: Path
) -> None:
    node = make_node("worker-1")

    first = node.attest()
    assert first.returncode == 3, first
    assert "pending operator approval" in first.stderr
    listing = broker.kbs("node", "list", "--json")
    ok(listing)
    assert [(n["name"], n["state"]) for n in json.loads(listing.stdout)] == [
        ("worker-1", "pending")
    ]

    key_path = write_key(tmp_path / "prod-key.pem", rsa.generate_private_key(65537, 3072))
    grant_node(broker, node, key_path)

    second = node.attest()
    assert second.returncode == 0, second
    for key_dir in range(2):
        installed = node.key_file("prod-key", key_dir)
        assert stat.S_IMODE(installed.stat().st_mode) == 0o600
        assert installed.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
        assert sorted(p.name for p in installed.parent.iterdir()) == ["prod-key.v1.pem"]

    # A real image encrypted to the key's public half decrypts with the installed file.
    secret = b"the image secret " + tmp_path.name.encode()
    make_oci_image(tmp_path / "plain", "v1", {"secret.txt": secret})
    skopeo_encrypt(tmp_path / "plain", "v1", tmp_path / "enc", key_path.with_suffix(".pub"))
    skopeo_decrypt(tmp_path / "enc", "v1", tmp_path / "dec", [node.key_file("prod-key")])
    assert read_file_from_image(tmp_path / "dec", "v1", "secret.txt") == secret

    # Tampered boot: a PCR the policy covers changes; the broker denies and the key goes.
    with Tpm.open(node.tpm.tcti) as tpm:
        tpm.extend_pcr(7, b"tampered bootloader")
    third = node.attest()
    assert third.returncode == 4, third
    assert "PCR 7" in third.stderr
    assert "prod-boot" in third.stderr
    assert str(node.key_file("prod-key")) in third.stderr
    assert not node.key_file("prod-key").exists()
    assert not node.key_file("prod-key", 1).exists()

    with Store.open(broker.directory / "kbs.db") as store:
        events = [(e.event, e.result) for e in store.list_audit(node="worker-1", limit=100)]
    assert ("enroll", "ok") in events
    assert ("attest", "pending") in events
    assert ("release", "ok") in events
    assert ("attest", "denied") in events
    audit = broker.kbs("audit", "--node", "worker-1")
    ok(audit)
    assert "PolicyDenied" in audit.stdout


def test_ec_key_and_regrant_after_rotation_of_grants(
    broker: Broker, make_node: NodeFactory, tmp_path: Path
) -> None:
    """An EC P-384 key goes through the same path; a second key granted later is added and a
    removed grant's file disappears on the next attestation (nothing else is touched)."""
    node = make_node("worker-2")
    assert node.attest().returncode == 3
    grant_node(
        broker, node, write_key(tmp_path / "k1.pem", ec.generate_private_key(ec.SECP384R1()))
    )
    foreign = node.key_dirs[0] / "operator-key.pem"
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(b"not ours")
    ok(node.attest())
    assert node.key_file("prod-key").exists()
    ok(
        broker.kbs(
            "key",
            "import",
            "second",
            "--private-key",
            str(write_key(tmp_path / "k2.pem", ec.generate_private_key(ec.SECP256R1()))),
        )
    )
    ok(broker.kbs("grant", "add", "second", "--selector", "region=eu"))
    ok(node.attest())
    assert sorted(p.name for p in node.key_file("prod-key").parent.iterdir()) == [
        "prod-key.v1.pem",
        "second.v1.pem",
    ]
    assert foreign.read_bytes() == b"not ours"


@pytest.fixture
def granted(broker: Broker, make_node: NodeFactory, tmp_path: Path) -> Node:
    node = make_node("granted-1")
    assert node.attest().returncode == 3
    grant_node(broker, node, write_key(tmp_path / "g.pem", rsa.generate_private_key(65537, 2048)))
    return node


def test_revoked_node_is_denied_and_loses_keys(broker: Broker, granted: Node) -> None:
    ok(granted.attest())
    assert granted.key_file("prod-key").exists()
    ok(broker.kbs("node", "revoke", granted.name))
    denied = granted.attest()
    assert denied.returncode == 4, denied
    assert "revoked" in denied.stderr
    assert not granted.key_file("prod-key").exists()


def test_node_without_grant_is_denied(broker: Broker, make_node: NodeFactory) -> None:
    node = make_node("lonely")
    assert node.attest().returncode == 3
    ok(broker.kbs("node", "approve", node.name, "--label", "cluster=dev"))
    ok(broker.kbs("policy", "set", "dev-boot", "--pcrs", "0,7", "--from-node", node.name))
    ok(broker.kbs("policy", "assign", "dev-boot", "--selector", "cluster=dev"))
    denied = node.attest()
    assert denied.returncode == 4, denied
    assert "no key is granted" in denied.stderr


def test_approved_node_without_policy_is_denied(broker: Broker, make_node: NodeFactory) -> None:
    node = make_node("no-policy")
    assert node.attest().returncode == 3
    ok(broker.kbs("node", "approve", node.name, "--label", "cluster=x"))
    denied = node.attest()
    assert denied.returncode == 4, denied
    assert "no attestation policy" in denied.stderr


def unproven(broker: Broker, reason: str) -> float:
    key = ("keylease_unproven_refusals_total", frozenset({("event", "enroll"), ("reason", reason)}))
    return scrape(metrics_port(broker)).get(key, 0.0)


def test_untrusted_ek_root_is_refused(
    broker: Broker, make_node: NodeFactory, foreign_ca: object
) -> None:
    node = make_node("stranger", ca=foreign_ca)
    result = node.attest()
    assert result.returncode == 5, result
    assert "EK" in result.stderr
    with Store.open(broker.directory / "kbs.db") as store:
        assert store.get_node("stranger") is None
        # anyone can present a (public) EK certificate: a metric and a log line, no audit row
        assert not any("UntrustedEk" in e.detail for e in store.list_audit(node="stranger"))
    assert unproven(broker, "UntrustedEk") == 1


def test_known_name_with_new_ek_is_refused(broker: Broker, make_node: NodeFactory) -> None:
    original = make_node("worker-9")
    assert original.attest().returncode == 3
    impostor = make_node("worker-9", distinct=True)
    result = impostor.attest()
    assert result.returncode == 5, result
    assert "another EK" in result.stderr
    with Store.open(broker.directory / "kbs.db") as store:
        node = store.get_node("worker-9")
        assert node is not None
        # anyone can present a (public) EK certificate: a metric and a log line, no audit row
        assert not any("NodeEkConflict" in e.detail for e in store.list_audit(node="worker-9"))
    assert unproven(broker, "NodeEkConflict") == 1


def test_no_key_material_in_logs_db_or_state(
    broker: Broker, make_node: NodeFactory, tmp_path: Path
) -> None:
    """Canary: a key's PEM body, its DER and its private scalar appear in no log line of broker
    or agent (debug level), not in the database and not in the agent's state directory."""
    canary = ec.generate_private_key(ec.SECP384R1())
    key_path = write_key(tmp_path / "canary.pem", canary)
    pem = key_path.read_bytes()
    der = canary.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    body_lines = [ln for ln in pem.decode().splitlines() if not ln.startswith("-----")]
    scalar = canary.private_numbers().private_value.to_bytes(48, "big")
    needles = [*body_lines, der.hex(), scalar.hex(), str(canary.private_numbers().private_value)]

    node = make_node("canary")
    outputs = [node.attest()]
    grant_node(broker, node, key_path, key_name="canary")
    from harness.broker import agent

    node.write_config()
    outputs.append(agent(node.config_path, "--verbose", "attest", "--once"))
    assert outputs[-1].returncode == 0, outputs[-1]
    assert (
        node.key_file("canary").read_bytes() == pem
    )  # it was released, so the test means something
    node_key = node.identity().key.reveal()  # the node's call key is never written anywhere
    needles += [node_key.hex()]
    broker.stop()  # flush the log

    texts = {
        "broker log": broker.log(),
        **{f"agent run {i}": r.stdout + r.stderr for i, r in enumerate(outputs)},
    }
    for where, text in texts.items():
        for needle in needles:
            assert needle not in text, f"key material in {where}"
    stored = [broker.directory / "kbs.db", *(node.root / "state").iterdir()]
    stored += list(broker.directory.glob("kbs.db-*"))
    for path in stored:
        blob = path.read_bytes()
        assert body_lines[1].encode() not in blob, f"key material in {path}"
        assert der not in blob, f"key material in {path}"
        assert node_key not in blob, f"the node key in {path}"
        assert scalar not in blob, f"key material in {path}"

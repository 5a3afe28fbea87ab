"""The operator commands of `keylease-kbs`, in-process on a real initialised broker directory:
key import formats and refusals, grants, selectors, policies, JSON output, the audit trail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kbs.cli import BROKER_MODULES, main
from kbs.config import load_config
from kbs.errors import StoreError
from kbs.masterkey import MasterKey, blob_key_id, key_aad, read_master_key
from kbs.model import NodeState
from kbs.store import Store
from tests.kbs.test_config import KBS, init_broker

EK = "c0ffee" + "0" * 58


class AnyNote(str):
    """Equal to any note that starts with this text (notes carry the date they were made)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.startswith(str.__str__(self))

    def __hash__(self) -> int:
        return 0


PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
PKCS8 = serialization.PrivateFormat.PKCS8
TRADITIONAL = serialization.PrivateFormat.TraditionalOpenSSL
PLAIN = serialization.NoEncryption()


@dataclass
class Result:
    code: int
    out: str
    err: str


Kbs = Callable[..., Result]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return init_broker(tmp_path)


@pytest.fixture
def kbs(config: Path, capsys: pytest.CaptureFixture[str]) -> Kbs:
    capsys.readouterr()

    def run(*args: str) -> Result:
        code = main(["--config", str(config), *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def open_store(config: Path) -> Store:
    return Store.open(load_config(config).database)


def add_node(config: Path, name: str = "worker-1", attested: bool = True) -> None:
    """A node as enrollment and a verified attestation leave it (written via the store)."""
    with open_store(config) as store:
        store.enroll_node(
            name=name,
            ek_hash=EK,
            ek_public=b"ek",
            ek_certificate=b"cert",
            ak_public=b"ak",
            state=NodeState.PENDING,
            metadata={},
            now=datetime.now(UTC),
        )
        if attested:
            store.record_attestation(
                name,
                banks={"sha256": {i: bytes([i]) * 32 for i in range(8)}},
                reset_count=1,
                restart_count=0,
                now=datetime.now(UTC),
            )


def events(config: Path) -> list[tuple[str, str, str]]:
    with open_store(config) as store:
        return [(e.actor.split(":")[0], e.event, e.result) for e in store.list_audit(limit=1000)]


# --- key import -------------------------------------------------------------------------------


def test_sec1_ec_key_is_stored_as_pkcs8_under_the_master_key(
    kbs: Kbs, config: Path, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "sec1.pem"
    path.write_bytes(key.private_bytes(PEM, TRADITIONAL, PLAIN))
    assert path.read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY-----")
    result = kbs("key", "import", "prod-key", "--private-key", str(path))
    assert result.code == 0, result
    assert "version 1 (EC-P384)" in result.out

    with open_store(config) as store:
        stored = store.get_key("prod-key")
    assert stored is not None
    assert stored.algorithm == "EC-P384"
    assert b"PRIVATE KEY" not in stored.encrypted_private
    master = MasterKey(read_master_key(load_config(config)).reveal())
    pem = master.open(stored.encrypted_private, key_aad("prod-key", 1)).reveal()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert pem == key.private_bytes(PEM, PKCS8, PLAIN)
    assert ("operator", "key-import", "ok") in events(config)


@pytest.mark.parametrize(
    ("make", "encoding", "fmt", "label"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), PEM, TRADITIONAL, "RSA-2048"),
        (lambda: rsa.generate_private_key(65537, 3072), DER, PKCS8, "RSA-3072"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), DER, TRADITIONAL, "EC-P256"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), PEM, PKCS8, "EC-P521"),
    ],
    ids=["pkcs1-pem", "pkcs8-der", "sec1-der", "pkcs8-pem"],
)
def test_accepted_key_formats(
    kbs: Kbs,
    tmp_path: Path,
    make: Callable[[], rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey],
    encoding: serialization.Encoding,
    fmt: serialization.PrivateFormat,
    label: str,
) -> None:
    path = tmp_path / "key"
    path.write_bytes(make().private_bytes(encoding, fmt, PLAIN))
    result = kbs("key", "import", "k", "--private-key", str(path))
    assert result.code == 0, result
    assert f"({label})" in result.out


def _two_keys() -> bytes:
    one = ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PKCS8, PLAIN)
    return one + ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PKCS8, PLAIN)


REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "small-rsa": (
        lambda: rsa.generate_private_key(65537, 1024).private_bytes(  # noqa: S505 (on purpose)
            PEM, PKCS8, PLAIN
        ),
        "RSA-1024 key; RSA keys must be 2048",
    ),
    "encrypted-pkcs8": (
        lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
            PEM, PKCS8, serialization.BestAvailableEncryption(b"pw")
        ),
        "encrypted",
    ),
    "encrypted-pkcs1": (
        lambda: rsa.generate_private_key(65537, 2048).private_bytes(
            PEM, TRADITIONAL, serialization.BestAvailableEncryption(b"pw")
        ),
        "encrypted",
    ),
    "encrypted-der": (
        lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
            DER, PKCS8, serialization.BestAvailableEncryption(b"pw")
        ),
        "encrypted",
    ),
    "ed25519": (
        lambda: ed25519.Ed25519PrivateKey.generate().private_bytes(PEM, PKCS8, PLAIN),
        "must be RSA or EC",
    ),
    "secp256k1": (
        lambda: ec.generate_private_key(ec.SECP256K1()).private_bytes(PEM, PKCS8, PLAIN),
        "curve secp256k1",
    ),
    "public-key": (
        lambda: (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        ),
        "public key",
    ),
    "public-der": (
        lambda: (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ),
        "public key",
    ),
    "two-keys": (_two_keys, "holds 2 private keys"),
    "garbage": (lambda: b"\x00\x01garbage\xff" * 10, "not a valid private key"),
    "garbage-pem": (
        lambda: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "not a valid private key",
    ),
    "empty": (lambda: b"", "is empty"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_keys_store_nothing(kbs: Kbs, config: Path, tmp_path: Path, case: str) -> None:
    make, message = REFUSED[case]
    path = tmp_path / "key"
    path.write_bytes(make())
    result = kbs("key", "import", "k", "--private-key", str(path))
    assert result.code == 2, result
    assert result.err.startswith("keylease-kbs: ")
    assert result.err.count("\n") == 1
    assert message in result.err
    assert str(path) in result.err
    with open_store(config) as store:
        assert store.list_keys() == []
    assert events(config) == []


def test_key_import_refuses_bad_names_and_missing_files(kbs: Kbs, tmp_path: Path) -> None:
    result = kbs("key", "import", "../etc", "--private-key", str(tmp_path / "nope"))
    assert result.code == 2
    assert "cannot read --private-key" in result.err
    path = tmp_path / "k.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PKCS8, PLAIN))
    result = kbs("key", "import", "../etc", "--private-key", str(path))
    assert result.code == 2
    assert "invalid key name" in result.err


def test_rotation_is_a_new_version_and_reimport_is_refused(
    kbs: Kbs, config: Path, tmp_path: Path
) -> None:
    v1, v2 = tmp_path / "v1.pem", tmp_path / "v2.pem"
    v1.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PKCS8, PLAIN))
    v2.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(PEM, PKCS8, PLAIN))
    ghost = kbs("key", "rotate", "rotating", "--private-key", str(v1))
    assert ghost.code == 2
    assert "no key named 'rotating' to rotate" in ghost.err
    assert "key import rotating" in ghost.err
    assert kbs("key", "import", "rotating", "--private-key", str(v1)).code == 0
    again = kbs("key", "import", "rotating", "--private-key", str(v2))
    assert again.code == 2
    assert "already exists (version 1)" in again.err
    assert "keylease-kbs key rotate rotating --private-key FILE" in again.err
    same = kbs("key", "rotate", "rotating", "--private-key", str(v1))
    assert same.code == 2
    assert "already has (version 1)" in same.err
    rotated = kbs("key", "rotate", "rotating", "--private-key", str(v2))
    assert rotated.code == 0, rotated
    assert "version 2 (EC-P384) is now current: encrypt new images to it" in rotated.out
    assert "older versions, which stay released" in rotated.out
    with open_store(config) as store:
        latest = store.get_key("rotating")
    assert latest is not None
    assert latest.version == 2
    master = MasterKey(read_master_key(load_config(config)).reveal())
    pem = master.open(latest.encrypted_private, key_aad("rotating", 2)).reveal()
    assert pem == v2.read_bytes()
    assert [e for e in events(config) if e[1].startswith("key-")] == [
        ("operator", "key-import", "ok"),
        ("operator", "key-rotate", "ok"),
    ]
    listing = kbs("key", "list", "--json")
    assert listing.code == 0
    assert [
        (k["name"], k["version"], k["state"], k["algorithm"], k["retired_at"])
        for k in json.loads(listing.out)
    ] == [
        ("rotating", 1, "active", "EC-P256", None),
        ("rotating", 2, "current", "EC-P384", None),
    ]
    table = kbs("key", "list")
    assert table.out.splitlines()[0].split() == [
        "NAME", "VERSION", "STATE", "ALGORITHM", "CREATED_AT", "RETIRED_AT"
    ]  # fmt: skip
    assert table.out.splitlines()[2].split()[:4] == ["rotating", "2", "current", "EC-P384"]
    assert "BEGIN" not in table.out


def test_key_retire_stops_releasing_one_older_version(
    kbs: Kbs, config: Path, tmp_path: Path
) -> None:
    """``key retire`` refuses the current version (saying to rotate first), an unknown or
    retired one and a bad number, changing nothing; otherwise it tells the granted nodes and
    ``key list`` / ``key show`` say "retired"."""
    add_node(config)
    assert kbs("node", "approve", "worker-1", "--label", "cluster=prod").code == 0
    for n in (1, 2, 3):
        verb = "import" if n == 1 else "rotate"
        key_file = ec_key_file(tmp_path / f"v{n}.pem")
        assert kbs("key", verb, "k", "--private-key", str(key_file)).code == 0
    assert kbs("grant", "add", "k", "--selector", "cluster=prod").code == 0
    with open_store(config) as store:
        last = store.last_change_id()
    audit_rows = len(events(config))
    current = kbs("key", "retire", "k", "--version", "3")
    assert current.code == 2
    assert "version 3 is key 'k''s current version" in current.err
    assert "rotate first (`keylease-kbs key rotate k --private-key FILE`)" in current.err
    unknown = kbs("key", "retire", "k", "--version", "7")
    assert (unknown.code, unknown.err.strip()) == (
        2, "keylease-kbs: key 'k' has no version 7 (versions: 1, 2, 3)"
    )  # fmt: skip
    assert "no key named 'ghost'" in kbs("key", "retire", "ghost", "--version", "1").err
    for bad in (["--version", "0"], ["--version", "-1"], ["--version", "x"],
                ["--version", "4294967296"], []):  # fmt: skip
        usage = kbs("key", "retire", "k", *bad)
        assert usage.code == 2
        assert "--version" in usage.err
    with open_store(config) as store:
        assert store.changes_since(last) == []
    assert len(events(config)) == audit_rows

    retired = kbs("key", "retire", "k", "--version", "1")
    assert retired.code == 0, retired
    assert "version 1 retired: no longer released; 1 node(s) told" in retired.out
    again = kbs("key", "retire", "k", "--version", "1")
    assert again.code == 2
    assert "version 1 of key 'k' was already retired at" in again.err
    assert events(config)[-1] == ("operator", "key-retire", "ok")
    with open_store(config) as store:
        assert [(c.node, c.kind.value) for c in store.changes_since(last)] == [
            ("worker-1", "changed")
        ]
        assert [k.version for k in store.keys_for_labels({"cluster": "prod"})] == [2, 3]
    listed = json.loads(kbs("key", "list", "--json").out)
    assert [(k["version"], k["state"]) for k in listed] == [
        (1, "retired"), (2, "active"), (3, "current")
    ]  # fmt: skip
    assert listed[0]["retired_at"] is not None
    shown = kbs("key", "show", "k", "--json")
    assert shown.code == 0, shown
    details = json.loads(shown.out)
    assert [v["state"] for v in details["versions"]] == ["retired", "active", "current"]
    assert (details["grants"], details["holders"]) == (["cluster=prod"], [])
    text = kbs("key", "show", "k").out
    assert "granted to: cluster=prod" in text
    assert "none" in text.splitlines()[-1]
    assert kbs("key", "show", "ghost").code == 2


# --- grants and selectors ---------------------------------------------------------------------


def test_grant_on_unknown_key_is_refused(kbs: Kbs, config: Path) -> None:
    result = kbs("grant", "add", "ghost", "--selector", "cluster=prod")
    assert result.code == 2
    assert "no key named 'ghost'" in result.err
    assert "key import ghost" in result.err
    assert events(config) == []


@pytest.mark.parametrize(
    "selector", ["", "cluster", "cluster=prod,", ",", "a b=c", "k=v,k=w", "k=", "=v", "k=v=w"]
)
def test_bad_selector_is_refused(kbs: Kbs, tmp_path: Path, selector: str) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PKCS8, PLAIN))
    assert kbs("key", "import", "k", "--private-key", str(path)).code == 0
    result = kbs("grant", "add", "k", "--selector", selector)
    assert result.code == 2, result
    assert result.err.startswith("keylease-kbs: ")
    assert "selector" in result.err or "label" in result.err
    assert kbs("grant", "list", "--json").out.strip() == "[]"


def test_grant_add_and_list(kbs: Kbs, tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PKCS8, PLAIN))
    assert kbs("key", "import", "k", "--private-key", str(path)).code == 0
    assert kbs("grant", "add", "k", "--selector", "region=eu,cluster=prod").code == 0
    again = kbs("grant", "add", "k", "--selector", "cluster=prod,region=eu")
    assert again.code == 2
    assert "already granted" in again.err
    grants = json.loads(kbs("grant", "list", "--json").out)
    assert [(g["key"], g["selector"]) for g in grants] == [
        ("k", {"cluster": "prod", "region": "eu"})
    ]
    assert "cluster=prod,region=eu" in kbs("grant", "list").out


def test_grant_remove_takes_the_exact_selector(kbs: Kbs, config: Path, tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PKCS8, PLAIN))
    assert kbs("key", "import", "k", "--private-key", str(path)).code == 0
    assert kbs("grant", "add", "k", "--selector", "cluster=prod,region=eu").code == 0
    partial = kbs("grant", "remove", "k", "--selector", "cluster=prod")
    assert partial.code == 2
    assert "not granted to cluster=prod" in partial.err
    assert "grant list" in partial.err
    assert kbs("grant", "remove", "k", "--selector", "region=eu,cluster=prod").code == 0
    assert kbs("grant", "list", "--json").out.strip() == "[]"
    assert kbs("grant", "remove", "k", "--selector", "cluster=prod,region=eu").code == 2
    assert kbs("grant", "remove", "k", "--selector", "cluster").code == 2
    assert [e[1] for e in events(config)] == ["key-import", "grant-add", "grant-remove"]


# --- nodes, allowlist, policies ---------------------------------------------------------------


def test_node_approve_show_revoke(kbs: Kbs, config: Path) -> None:
    add_node(config)
    listing = json.loads(kbs("node", "list", "--json").out)
    assert [(n["name"], n["state"], n["ek_hash"]) for n in listing] == [("worker-1", "pending", EK)]
    result = kbs("node", "approve", "worker-1", "--label", "cluster=prod", "--label", "region=eu")
    assert result.code == 0, result
    shown = json.loads(kbs("node", "show", "worker-1", "--json").out)
    assert shown["state"] == "approved"
    assert shown["labels"] == {"cluster": "prod", "region": "eu"}
    assert shown["pcrs"]["sha256"]["7"] == "07" * 32
    assert "boot_state" not in shown  # the node sent no event log
    assert shown["last_attested_at"] is not None
    text = kbs("node", "show", "worker-1").out
    assert EK in text
    assert "07" * 32 in text
    assert "cluster=prod,region=eu" in kbs("node", "list").out
    assert kbs("node", "revoke", "worker-1").code == 0
    assert json.loads(kbs("node", "show", "worker-1", "--json").out)["state"] == "revoked"
    missing = kbs("node", "approve", "nobody")
    assert missing.code == 2
    assert "no node named 'nobody'" in missing.err
    assert kbs("node", "show", "nobody").code == 2
    bad = kbs("node", "approve", "worker-1", "--label", "cluster")
    assert bad.code == 2
    assert "key=value" in bad.err


def test_allowlist(kbs: Kbs) -> None:
    assert kbs("allowlist", "add", "xyz").code == 2
    assert kbs("allowlist", "add", EK.upper()).code == 0
    assert "already" in kbs("allowlist", "add", EK).out
    entries = json.loads(kbs("allowlist", "list", "--json").out)
    assert [e["ek_hash"] for e in entries] == [EK]
    assert EK in kbs("allowlist", "list").out


def test_policy_set_needs_a_node_with_a_verified_attestation(kbs: Kbs, config: Path) -> None:
    refused = kbs("policy", "set", "boot", "--pcrs", "0,7")
    assert refused.code == 2
    assert "--from-node" in refused.err
    assert "last verified attestation" in refused.err
    add_node(config, "fresh", attested=False)
    fresh = kbs("policy", "set", "boot", "--pcrs", "0,7", "--from-node", "fresh")
    assert fresh.code == 2
    assert "no verified attestation yet" in fresh.err
    assert kbs("policy", "set", "boot", "--pcrs", "0,7", "--from-node", "ghost").code == 2
    assert kbs("policy", "set", "boot", "--pcrs", "0,x", "--from-node", "fresh").code == 2
    assert kbs("policy", "set", "boot", "--pcrs", "0,0", "--from-node", "fresh").code == 2


def test_policy_set_assign_list(kbs: Kbs, config: Path) -> None:
    add_node(config, "ref")
    result = kbs("policy", "set", "boot", "--pcrs", "7,0", "--from-node", "ref")
    assert result.code == 0, result
    missing = kbs("policy", "set", "boot", "--pcrs", "0,12", "--from-node", "ref")
    assert missing.code == 2
    assert "did not quote pcr.12" in missing.err
    assert kbs("policy", "assign", "boot", "--selector", "cluster=prod").code == 0
    assert kbs("policy", "assign", "nope", "--selector", "cluster=prod").code == 2
    policies = json.loads(kbs("policy", "list", "--json").out)
    assert policies == [
        {
            "name": "boot",
            "pcr_bank": "sha256",
            "pcrs": [0, 7],
            "components": {
                f"pcr.{i}": {
                    "allow": [
                        {
                            "value": f"{i:02x}" * 32,
                            "note": AnyNote("quoted value; allowed from ref"),
                        }
                    ],
                    "contains": [],
                }
                for i in (0, 7)
            },
            "selectors": ["cluster=prod"],
        }
    ]
    assert "cluster=prod" in kbs("policy", "list").out


# --- audit and the trail of every change ------------------------------------------------------


def test_every_change_leaves_an_audit_row(kbs: Kbs, config: Path, tmp_path: Path) -> None:
    add_node(config, "worker-1")
    path = tmp_path / "k.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PKCS8, PLAIN))
    steps = [
        ("node", "approve", "worker-1", "--label", "cluster=prod"),
        ("allowlist", "add", EK),
        ("key", "import", "k", "--private-key", str(path)),
        ("grant", "add", "k", "--selector", "cluster=prod"),
        ("policy", "set", "boot", "--pcrs", "0,7", "--from-node", "worker-1"),
        ("policy", "assign", "boot", "--selector", "cluster=prod"),
        ("node", "revoke", "worker-1"),
    ]
    for step in steps:
        assert kbs(*step).code == 0, step
    assert [e for e in events(config)] == [
        ("operator", event, "ok")
        for event in (
            "approve",
            "allowlist-add",
            "key-import",
            "grant-add",
            "policy-set",
            "policy-assign",
            "revoke",
        )
    ]
    audit = kbs("audit", "--node", "worker-1")
    assert audit.code == 0
    assert "approve" in audit.out
    assert "labels cluster=prod" in audit.out
    assert "policy boot sha256 pcrs 0,7 from node worker-1" in audit.out
    entries = json.loads(kbs("audit", "--json", "--limit", "2").out)
    assert [e["event"] for e in entries] == ["policy-assign", "revoke"]
    assert all(e["actor"].startswith("operator:") for e in entries)


def test_audit_shows_refusal_details(kbs: Kbs, config: Path) -> None:
    with open_store(config) as store:
        store.audit(
            actor="node:worker-1",
            event="attest",
            node="worker-1",
            result="denied",
            detail="PolicyDenied: PCR 7 (sha256) differ from policy prod-boot",
            now=datetime.now(UTC),
        )
    out = kbs("audit", "--node", "worker-1").out
    assert "PolicyDenied: PCR 7 (sha256) differ from policy prod-boot" in out
    assert kbs("audit", "--limit", "0").code == 2


def test_node_metadata_and_refusal_details_are_escaped_on_the_terminal(
    kbs: Kbs, config: Path
) -> None:
    """Node metadata and audit details quote what a node or a certificate sent: terminal escape
    sequences and newlines are shown escaped, never acted on (JSON escapes them itself)."""
    hostile = "\x1b]0;owned\x07\x1b[2J\nINFO forged line\u202e"
    with open_store(config) as store:
        store.enroll_node(
            name="worker-1", ek_hash=EK, ek_public=b"ek", ek_certificate=b"cert",
            ak_public=b"ak", state=NodeState.PENDING, metadata={"hostname": hostile},
            now=datetime.now(UTC),
        )  # fmt: skip
        store.audit(
            actor="node:worker-1", event="enroll", node="worker-1", result="refused",
            detail=f"UntrustedEk: issuer {hostile}", now=datetime.now(UTC),
        )  # fmt: skip
    escaped = r"\x1b]0;owned\x07\x1b[2J\x0aINFO forged line\u202e"
    for out in (kbs("node", "show", "worker-1").out, kbs("audit").out):
        assert not {"\x1b", "\x07", "\u202e"} & set(out)
        assert escaped in out
        assert "\nINFO forged line" not in out
    shown = json.loads(kbs("node", "show", "worker-1", "--json").out)
    assert shown["metadata"]["hostname"] == hostile  # JSON carries it exactly, escaped
    assert "\x1b" not in kbs("node", "show", "worker-1", "--json").out


def test_a_broker_from_before_signed_releases_names_the_command_that_upgrades_it(
    kbs: Kbs, config: Path
) -> None:
    (config.parent / "tls" / "signing.pem").unlink()
    (config.parent / "tls" / "signing-key.pem").unlink()
    refused = kbs("check-config")
    assert refused.code == 2
    assert "keylease-kbs signing-key create" in refused.err
    created = kbs("signing-key", "create")
    assert created.code == 0, created
    key = config.parent / "tls" / "signing-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    checked = kbs("check-config")
    assert checked.code == 0, checked
    assert "signing_cert" in checked.out
    assert "release signing" in checked.out
    again = kbs("signing-key", "create")
    assert again.code == 2
    assert "--replace" in again.err
    old = key.read_bytes()
    assert kbs("signing-key", "create", "--replace").code == 0
    assert key.read_bytes() != old
    assert ("operator", "signing-key-create", "ok") in events(config)


def test_a_signing_certificate_not_marked_for_release_signing_is_refused(
    kbs: Kbs, config: Path
) -> None:
    """The TLS server certificate (same CA, same kind of key) is no release-signing certificate:
    a broker using it would have every release refused by the agents, so it does not start."""
    tls = config.parent / "tls"
    (tls / "signing.pem").write_bytes((tls / "server.pem").read_bytes())
    (tls / "signing-key.pem").write_bytes((tls / "server-key.pem").read_bytes())
    refused = kbs("check-config")
    assert refused.code == 2
    assert "not marked OU=keylease-signing" in refused.err
    assert "agents would refuse every release" in refused.err


# --- usage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["init"],
        ["serve"],
        ["check-config"],
        ["audit"],
        ["node"],
        ["node", "list"],
        ["node", "show"],
        ["node", "approve"],
        ["node", "revoke"],
        ["allowlist", "add"],
        ["allowlist", "list"],
        ["key", "import"],
        ["key", "list"],
        ["grant", "add"],
        ["grant", "remove"],
        ["key", "rotate"],
        ["key", "retire"],
        ["key", "show"],
        ["grant", "list"],
        ["policy", "set"],
        ["policy", "learn"],
        ["policy", "allow"],
        ["policy", "show"],
        ["policy", "diff"],
        ["policy", "export"],
        ["policy", "apply"],
        ["policy", "assign"],
        ["policy", "unassign"],
        ["policy", "list"],
    ],
)
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    assert "usage: keylease-kbs" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["node", "frobnicate"]) == 2
    assert main(["grant", "add", "k"]) == 2  # --selector is required
    assert main(["--config", str(tmp_path / "none.toml"), "node", "list"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- serve ------------------------------------------------------------------------------------


def test_serve_starts_and_stops_on_sigterm(config: Path) -> None:
    ready = config.parent / "ready"
    proc = subprocess.Popen(
        [KBS, "--config", str(config), "serve", "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        host, _, port = ready.read_text().strip().rpartition(":")
        assert host == "127.0.0.1"
        assert int(port) > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "INFO kbs.server: keylease-kbs serving on 127.0.0.1:" in err
    assert (config.parent / "kbs.db").exists()


def test_serve_refuses_a_bad_setup_in_one_line(config: Path) -> None:
    os.chmod(config.parent / "master.key", 0o644)
    proc = subprocess.run(
        [KBS, "--config", str(config), "serve"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("keylease-kbs: master_key ")
    assert f"chmod 600 {config.parent / 'master.key'}" in proc.stderr
    assert proc.stderr.count("\n") == 1


# --- the change feed behind the Watch stream -----------------------------------------------------


def test_operator_changes_notify_exactly_the_nodes_they_concern(
    kbs: Kbs, config: Path, tmp_path: Path
) -> None:
    """Each change row is written by the command's own transaction, for the nodes it concerns
    (revoked nodes are only ever told they are revoked); a refused command writes none."""
    with open_store(config) as store:
        for i, name in enumerate(("a", "b", "c")):
            store.enroll_node(name=name, ek_hash=f"{i:064x}", ek_public=b"ek",
                              ek_certificate=b"cert", ak_public=b"ak", state=NodeState.PENDING,
                              metadata={}, now=datetime.now(UTC))  # fmt: skip
        store.record_attestation("a", banks={"sha256": {0: b"\0" * 32}}, reset_count=1,
                                 restart_count=0, now=datetime.now(UTC))  # fmt: skip
        start = store.last_change_id()
    keys = []
    for i in range(2):
        keys.append(tmp_path / f"k{i}.pem")
        keys[-1].write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PKCS8, PLAIN)
        )
    steps: list[tuple[tuple[str, ...], list[tuple[str | None, str]]]] = [
        (("node", "approve", "a", "--label", "cluster=prod"), [("a", "changed")]),
        (("node", "approve", "b", "--label", "cluster=dev"), [("b", "changed")]),
        (("node", "approve", "c", "--label", "cluster=prod"), [("c", "changed")]),
        (("node", "revoke", "c"), [("c", "revoked")]),
        (("key", "import", "k", "--private-key", str(keys[0])), []),
        (("grant", "add", "k", "--selector", "cluster=prod"), [("a", "changed")]),
        (("grant", "add", "k", "--selector", "cluster=prod"), []),  # refused: already granted
        (("key", "rotate", "k", "--private-key", str(keys[1])), [("a", "changed")]),
        (("key", "retire", "k", "--version", "2"), []),  # refused: the current version
        (("key", "retire", "k", "--version", "1"), [("a", "changed")]),
        (("policy", "set", "boot", "--pcrs", "0", "--from-node", "a"), []),  # assigned to none
        (("policy", "assign", "boot", "--selector", "cluster=dev"), [("b", "changed")]),
        (("policy", "set", "boot", "--pcrs", "0", "--from-node", "a"), [("b", "changed")]),
        (("grant", "remove", "k", "--selector", "cluster=prod"), [("a", "changed")]),
        (("grant", "remove", "k", "--selector", "cluster=prod"), []),  # refused: no such grant
    ]
    last = start
    for argv, expected in steps:
        kbs(*argv)
        with open_store(config) as store:
            changes = store.changes_since(last)
        assert [(c.node, c.kind.value) for c in changes] == expected, argv
        assert all(c.reason and "k" not in c.reason.split() for c in changes)
        last = changes[-1].id if changes else last


# --- key delete and master-key rotation (local) -------------------------------------------------


def ec_key_file(path: Path) -> Path:
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PKCS8, PLAIN))
    return path


def test_key_delete_removes_versions_and_grants_and_tells_the_nodes(
    kbs: Kbs, config: Path, tmp_path: Path
) -> None:
    add_node(config)
    assert kbs("node", "approve", "worker-1", "--label", "cluster=prod").code == 0
    assert kbs("key", "import", "k", "--private-key", str(ec_key_file(tmp_path / "a"))).code == 0
    assert kbs("key", "rotate", "k", "--private-key", str(ec_key_file(tmp_path / "b"))).code == 0
    assert (
        kbs("key", "import", "other", "--private-key", str(ec_key_file(tmp_path / "c"))).code == 0
    )
    assert kbs("grant", "add", "k", "--selector", "cluster=prod").code == 0
    assert kbs("grant", "add", "other", "--selector", "cluster=prod").code == 0
    with open_store(config) as store:
        last = store.last_change_id()
    result = kbs("key", "delete", "k")
    assert result.code == 0, result
    assert "2 version(s), 1 grant(s)); 1 node(s) told" in result.out
    assert [k["name"] for k in json.loads(kbs("key", "list", "--json").out)] == ["other"]
    assert [g["key"] for g in json.loads(kbs("grant", "list", "--json").out)] == ["other"]
    with open_store(config) as store:
        assert [(c.node, c.kind.value) for c in store.changes_since(last)] == [
            ("worker-1", "changed")
        ]
    assert events(config)[-1] == ("operator", "key-delete", "ok")
    missing = kbs("key", "delete", "k")
    assert missing.code == 2
    assert "no key named 'k'" in missing.err


def test_master_key_rotation_reencrypts_every_version(
    kbs: Kbs, config: Path, tmp_path: Path
) -> None:
    cfg = load_config(config)
    old = MasterKey(read_master_key(cfg).reveal())
    # a row sealed in the version-1 format (before key ids) is read and re-encrypted too
    nonce = os.urandom(12)
    v1 = (
        b"\x01"
        + nonce
        + AESGCM(read_master_key(cfg).reveal()).encrypt(
            nonce, b"legacy", b"\x01" + key_aad("legacy", 1)
        )
    )
    with open_store(config) as store:
        store.add_key("legacy", "EC-P256", v1, datetime.now(UTC))
    assert kbs("key", "import", "k", "--private-key", str(ec_key_file(tmp_path / "a"))).code == 0
    assert kbs("key", "rotate", "k", "--private-key", str(ec_key_file(tmp_path / "b"))).code == 0
    new = tmp_path / "new.key"
    new.write_bytes(os.urandom(32))
    new.chmod(0o644)
    loose = kbs("master-key", "rotate", "--new-key", str(new))
    assert loose.code == 2
    assert f"chmod 600 {new}" in loose.err
    new.chmod(0o600)
    same = kbs("master-key", "rotate", "--new-key", str(cfg.master_key))  # resumes: v1 row
    assert same.code == 0, same
    assert "already master_key" in same.out
    assert "re-encrypted 1 key version(s)" in same.out
    result = kbs("master-key", "rotate", "--new-key", str(new))
    assert result.code == 0, result
    assert "re-encrypted 3 key version(s)" in result.out
    rotated = load_config(config)
    assert rotated.master_key == new
    assert rotated.previous_master_keys == (cfg.master_key,)
    only_new = MasterKey(new.read_bytes())
    with open_store(config) as store:
        rows = store.sealed_key_rows()
    assert [blob_key_id(r.encrypted_private) for r in rows] == [only_new.current_id] * 3
    assert only_new.open(rows[0].encrypted_private, key_aad("k", 1)).reveal().startswith(b"-----")
    assert only_new.open(rows[2].encrypted_private, key_aad("legacy", 1)).reveal() == b"legacy"
    with pytest.raises(StoreError):
        old.open(rows[0].encrypted_private, key_aad("k", 1))
    status = kbs("master-key", "status").out.splitlines()
    assert status[1].split()[2:] == ["current", "3"]
    assert status[2].split()[2:] == ["previous", "0"]
    assert events(config)[-1] == ("operator", "master-key-rotate", "ok")
    # a second rotation (generated key) keeps both older keys until the operator drops them
    assert kbs("master-key", "rotate", "--generate").code == 0
    assert len(load_config(config).previous_master_keys) == 2


def test_remote_broker_unreachable_exits_1(kbs: Kbs, tmp_path: Path) -> None:
    assert kbs("admin-cert", "issue", "alice", "--out", str(tmp_path / "alice")).code == 0
    result = kbs("--server", "127.0.0.1:1", "--admin-cert", str(tmp_path / "alice"), "node", "list")
    assert result.code == 1
    assert "cannot reach the admin API at 127.0.0.1:1" in result.err


@pytest.mark.parametrize("absent", [BROKER_MODULES, ("prometheus_client",)])
def test_without_the_broker_extra_it_names_the_extra(absent: tuple[str, ...]) -> None:
    """An install without the `broker` extra (a node's `keylease[agent]`) gets one line naming
    the extra and exit 2, before anything that needs the extra is imported (no traceback)."""
    code = "\n".join(
        [
            "import sys",
            f"for name in {absent!r}:",
            "    sys.modules[name] = None  # not installed: find_spec finds nothing, import fails",
            "from kbs.cli import main",
            "sys.exit(main(['node', 'list']))",
        ]
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert proc.stderr == (
        f"keylease-kbs: this installation lacks the 'broker' extra (missing: {', '.join(absent)}); "
        "install it with: pip install 'keylease[broker]'\n"
    )

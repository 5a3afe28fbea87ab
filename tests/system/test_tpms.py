"""More TPMs, end to end through the agent and the broker: a TPM with only the sha1 bank active,
one with sha1, sha256 and sha384 (a policy over sha384: the release is sealed in that bank), and
one whose only EK certificate is for an ECC P-256 EK (NV 0x01c0000a), for enrollment, credential
activation and the TPM-bound release. Each TPM is made by swtpm_setup."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.tpm import Tpm
from harness.broker import Broker
from harness.eventlog import BootSpec, boot_events, build_log, extend_tpm, signing_certificate
from harness.keys import write_key
from harness.nodes import Node
from harness.operator import ok
from harness.swtpm import Swtpm, SwtpmCa, provision, provision_ecc256

Provision = Callable[[Path, SwtpmCa], None]
SPEC = BootSpec(
    db_certs=(signing_certificate("db"),),
    kek_certs=(signing_certificate("kek"),),
    pk_cert=signing_certificate("pk"),
)


@pytest.fixture
def tpms() -> Iterator[list[Swtpm]]:
    started: list[Swtpm] = []
    yield started
    for tpm in started:
        tpm.stop()


def node_on(
    name: str, make: Provision, broker: Broker, ca: SwtpmCa, root: Path, shm: Path,
    started: list[Swtpm], banks: Sequence[str],
) -> Node:  # fmt: skip
    (root / name).mkdir()
    make(root / name / "tpm", ca)
    tpm = Swtpm(root / name / "tpm")
    started.append(tpm)
    tpm.start()
    events = boot_events(SPEC)
    extend_tpm(tpm.tcti, events)
    (shm / name).mkdir()
    node = Node(name=name, tpm=tpm, root=root / name, keys_root=shm / name, broker=broker)
    node.event_log = root / name / "binary_bios_measurements"
    node.event_log.write_bytes(build_log(events, banks))
    return node


def release_to(broker: Broker, node: Node, key: Path, bank: str) -> None:
    first = node.attest()
    assert first.returncode == 3, first
    ok(broker.kbs("node", "approve", node.name, "--label", f"node={node.name}"))
    ok(broker.kbs("policy", "learn", f"{node.name}-boot", "--from-node", node.name, "--bank", bank))
    ok(broker.kbs("policy", "assign", f"{node.name}-boot", "--selector", f"node={node.name}"))
    ok(broker.kbs("grant", "add", "k", "--selector", f"node={node.name}"))
    released = node.attest()
    assert released.returncode == 0, released
    assert node.key_file("k").read_bytes() == key.read_bytes()


@pytest.mark.parametrize(
    ("banks", "policy_bank"),
    [(("sha1",), "sha1"), (("sha1", "sha256", "sha384"), "sha384")],
    ids=["sha1-only", "three-banks"],
)
def test_pcr_banks(
    broker: Broker, swtpm_ca: SwtpmCa, tmp_path: Path, shm_path: Path, tpms: list[Swtpm],
    banks: tuple[str, ...], policy_bank: str,
) -> None:  # fmt: skip
    key = write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()))
    ok(broker.kbs("key", "import", "k", "--private-key", str(key)))

    def make(state: Path, ca: SwtpmCa) -> None:
        provision(state, ca, banks)

    node = node_on("banks", make, broker, swtpm_ca, tmp_path, shm_path, tpms, banks)
    release_to(broker, node, key, policy_bank)
    with Tpm.open(node.tpm.tcti) as tpm:
        tpm.extend_pcr(4, b"another boot application")
    denied = node.attest()
    assert denied.returncode == 4, denied
    assert f"the boot event log does not replay to the quoted PCR 4 ({banks[0]})" in denied.stderr
    if policy_bank != "sha256":
        refused = broker.kbs("policy", "learn", "x", "--from-node", "banks", "--bank", "sha256")
        if "sha256" not in banks:
            assert refused.returncode == 2
            assert f"last quoted {', '.join(banks)}, not sha256" in refused.stderr


def test_ecc_p256_ek(
    broker: Broker, swtpm_ca: SwtpmCa, tmp_path: Path, shm_path: Path, tpms: list[Swtpm]
) -> None:
    key = write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP384R1()))
    ok(broker.kbs("key", "import", "k", "--private-key", str(key)))
    node = node_on("ecc", provision_ecc256, broker, swtpm_ca, tmp_path, shm_path, tpms, ["sha256"])
    with Tpm.open(node.tpm.tcti) as tpm:
        cert = x509.load_der_x509_certificate(tpm.read_ek().certificate)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    release_to(broker, node, key, "sha256")
    # Renewal: a second attestation of the same boot releases again.
    ok(node.attest())

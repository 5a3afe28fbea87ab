"""Each attack from DESIGN.md's threat table, against the real broker over TLS and real swtpms:
refused with a specific error and nothing released. A refusal that is not a verdict on the node
(a replayed or expired nonce, a quote that does not verify) is ``AttestationRefused`` (the agent
keeps its keys); a verdict (an event log that does not replay) is ``AttestationDenied``. A
refusal of a call the node authenticated is an audit row; one that anybody could cause (an
enrollment with mismatched EK data) is counted in ``keylease_unproven_refusals_total`` and not
written to the audit log (issue 10: strangers must not grow the audit table)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from tpm2_pytss import TPM2B_PUBLIC, TPMA_OBJECT

from agent.broker import BrokerClient
from agent.enroll import Enrolled, enroll
from agent.errors import (
    AttestationDenied,
    AttestationRefused,
    EnrollmentRefused,
    ReleaseInvalid,
    TpmError,
)
from agent.release import open_release
from agent.signature import ReleaseTrust
from agent.state import StateDir
from agent.tpm import AkBlobs, Quote, Tpm
from harness.broker import Broker
from harness.eventlog import build_event_log, build_log, measured
from harness.keys import write_key
from harness.netops import metrics_port, node_call, scrape
from harness.nodes import Node
from harness.operator import grant_node
from kbs.store import Store
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1 import keylease_pb2_grpc as pb_grpc
from keylease.api.v1 import qualifying_data
from keylease.api.v1.nodeauth import ATTEST

NodeFactory = Callable[..., Node]


@contextmanager
def session(node: Node) -> Iterator[tuple[Tpm, BrokerClient, StateDir]]:
    cfg = node.config()
    with Tpm.open(node.tpm.tcti) as tpm, BrokerClient(cfg) as client:
        yield tpm, client, StateDir.open(cfg.state_dir)


def enrolled(node: Node) -> Enrolled:
    cfg = node.config()
    with session(node) as (tpm, client, state):
        return enroll(cfg, tpm, client, state)


def trust(broker: Broker) -> ReleaseTrust:
    return ReleaseTrust.load(broker.ca)


def audit_details(broker: Broker, node: str) -> list[str]:
    with Store.open(broker.directory / "kbs.db") as store:
        return [f"{e.event} {e.result} {e.detail}" for e in store.list_audit(node=node, limit=200)]


def unaudited(broker: Broker, node: str, event: str, reason: str) -> bool:
    """The refusal ``reason`` (an error class) was counted as unproven and is no audit row."""
    counted = scrape(metrics_port(broker)).get(
        ("keylease_unproven_refusals_total", frozenset({("event", event), ("reason", reason)})), 0
    )
    return counted >= 1 and not any(reason in d for d in audit_details(broker, node))


def audited(broker: Broker, node: str, event: str, reason: str) -> bool:
    """The refusal ``reason`` of a call the node authenticated is an audit row (it proves who
    was refused), not an unproven-refusal count."""
    counted = scrape(metrics_port(broker)).get(
        ("keylease_unproven_refusals_total", frozenset({("event", event), ("reason", reason)})), 0
    )
    return counted == 0 and any(
        d.startswith(event) and reason in d for d in audit_details(broker, node)
    )


def releases(broker: Broker, node: str) -> int:
    return sum(1 for d in audit_details(broker, node) if d.startswith("release "))


def fresh_quote(tpm: Tpm, ak: AkBlobs, nonce: bytes) -> Quote:
    return tpm.quote(ak, qualifying_data(nonce))


@pytest.fixture
def granted(broker: Broker, make_node: NodeFactory, tmp_path: Path) -> tuple[Node, Enrolled]:
    node = make_node("victim")
    me = enrolled(node)
    with session(node) as (tpm, client, _):
        nonce = client.get_nonce(me.identity)
        client.attest(me.identity, nonce, fresh_quote(tpm, me.ak, nonce), b"")  # pending
    grant_node(broker, node, write_key(tmp_path / "k.pem", rsa.generate_private_key(65537, 2048)))
    return node, me


def test_valid_programmatic_attestation_releases(
    broker: Broker, granted: tuple[Node, Enrolled]
) -> None:
    """The control for the tests below: the same calls, untampered, do release."""
    node, me = granted
    ak = me.ak
    with session(node) as (tpm, client, _):
        nonce = client.get_nonce(me.identity)
        reply = client.attest(me.identity, nonce, fresh_quote(tpm, ak, nonce), b"")
        assert reply.release is not None
        approval = reply.release.approvals[0]  # the state just verified
        bundle = open_release(tpm, reply.release, node.name, trust(broker), approval)
    assert [k.name for k in bundle.keys] == ["prod-key"]
    assert releases(broker, node.name) == 1


def test_replayed_nonce_is_refused(broker: Broker, granted: tuple[Node, Enrolled]) -> None:
    node, me = granted
    ak = me.ak
    with session(node) as (tpm, client, _):
        nonce = client.get_nonce(me.identity)
        quote = fresh_quote(tpm, ak, nonce)
        client.attest(me.identity, nonce, quote, b"")
        with pytest.raises(AttestationRefused, match=r"already used|not issued"):
            client.attest(me.identity, nonce, quote, b"")
    assert releases(broker, node.name) == 1
    assert audited(broker, node.name, "attest", "NonceUnknown")


def test_expired_nonce_is_refused(broker: Broker, granted: tuple[Node, Enrolled]) -> None:
    node, me = granted
    ak = me.ak
    broker.stop()
    text = broker.config.read_text().splitlines()
    broker.config.write_text(
        "\n".join(
            [ln for ln in text if not ln.startswith("nonce_ttl_seconds")]
            + ["nonce_ttl_seconds = 1", ""]
        )
    )
    broker.start()
    with session(node) as (tpm, client, _):
        nonce = client.get_nonce(me.identity)
        quote = fresh_quote(tpm, ak, nonce)
        time.sleep(2.1)
        with pytest.raises(AttestationRefused, match="expired"):
            client.attest(me.identity, nonce, quote, b"")
    assert releases(broker, node.name) == 0
    assert audited(broker, node.name, "attest", "NonceExpired")


def test_quote_over_another_nonce_is_refused(
    broker: Broker, granted: tuple[Node, Enrolled]
) -> None:
    node, me = granted
    ak = me.ak
    with session(node) as (tpm, client, _):
        old = client.get_nonce(me.identity)
        new = client.get_nonce(me.identity)
        with pytest.raises(AttestationRefused):
            client.attest(me.identity, new, fresh_quote(tpm, ak, old), b"")
    assert releases(broker, node.name) == 0
    assert audited(broker, node.name, "attest", "QualifyingDataMismatch")


def test_quote_with_one_byte_changed_is_refused(
    broker: Broker, granted: tuple[Node, Enrolled]
) -> None:
    node, me = granted
    ak = me.ak
    with session(node) as (tpm, client, _):
        nonce = client.get_nonce(me.identity)
        quote = fresh_quote(tpm, ak, nonce)
        tampered = bytearray(quote.attest)
        tampered[-40] ^= 0x01
        bad = Quote(bytes(tampered), quote.signature, quote.banks)
        with pytest.raises(AttestationRefused):
            client.attest(me.identity, nonce, bad, b"")
    assert releases(broker, node.name) == 0
    assert audited(broker, node.name, "attest", "IncorrectSignature")


def test_pcr_value_lied_about_is_refused(broker: Broker, granted: tuple[Node, Enrolled]) -> None:
    node, me = granted
    ak = me.ak
    with session(node) as (tpm, client, _):
        nonce = client.get_nonce(me.identity)
        quote = fresh_quote(tpm, ak, nonce)
        pcrs = dict(quote.banks["sha256"])
        pcrs[7] = b"\x01" * 32
        with pytest.raises(AttestationRefused):
            client.attest(
                me.identity,
                nonce,
                Quote(quote.attest, quote.signature, {"sha256": pcrs}),
                b"",
            )
    assert any("PcrDigestMismatch" in d for d in audit_details(broker, node.name))


def test_release_opens_only_in_its_tpm_and_state(
    broker: Broker, granted: tuple[Node, Enrolled], make_node: NodeFactory
) -> None:
    node, me = granted
    ak = me.ak
    with session(node) as (tpm, client, _):
        nonce = client.get_nonce(me.identity)
        reply = client.attest(me.identity, nonce, fresh_quote(tpm, ak, nonce), b"")
    assert reply.release is not None
    captured = reply.release  # a recorded release: frozen bytes, as an eavesdropper keeps them
    approval = captured.approvals[0]  # and its approval of the state just verified
    other = make_node("other", distinct=True)
    with Tpm.open(other.tpm.tcti) as other_tpm, pytest.raises(ReleaseInvalid):
        open_release(other_tpm, captured, node.name, trust(broker), approval)
    with Tpm.open(node.tpm.tcti) as tpm:
        open_release(tpm, captured, node.name, trust(broker), approval)  # opens here, this state
        tpm.extend_pcr(4, b"new kernel")
        with pytest.raises(ReleaseInvalid, match="PCRs are not the approved values"):
            open_release(tpm, captured, node.name, trust(broker), approval)


def test_ek_certificate_and_public_mismatch_is_refused(
    broker: Broker, make_node: NodeFactory
) -> None:
    a, b = make_node("ek-a"), make_node("ek-b", distinct=True)
    with (
        Tpm.open(a.tpm.tcti) as tpm_a,
        Tpm.open(b.tpm.tcti) as tpm_b,
        BrokerClient(a.config()) as client,
    ):
        ak = tpm_a.create_ak()
        with pytest.raises(EnrollmentRefused, match="EK"):
            client.start_enrollment(
                "ek-a", tpm_a.read_ek().certificate, tpm_b.read_ek().public, ak.public, {}
            )
    assert unaudited(broker, "ek-a", "enroll", "EkPublicMismatch")


def test_ak_with_wrong_attributes_is_refused(broker: Broker, make_node: NodeFactory) -> None:
    node = make_node("weak-ak")
    with Tpm.open(node.tpm.tcti) as tpm, BrokerClient(node.config()) as client:
        ak = tpm.create_ak()
        public, _ = TPM2B_PUBLIC.unmarshal(ak.public)
        public.publicArea.objectAttributes &= ~TPMA_OBJECT.RESTRICTED
        ek = tpm.read_ek()
        with pytest.raises(EnrollmentRefused, match="restricted"):
            client.start_enrollment("weak-ak", ek.certificate, ek.public, public.marshal(), {})
    assert unaudited(broker, "weak-ak", "enroll", "AkAttributesInvalid")


def test_activation_by_another_tpm_is_refused(broker: Broker, make_node: NodeFactory) -> None:
    """The attacker has node A's (public) EK certificate but its AK lives in TPM B."""
    a, b = make_node("act-a"), make_node("act-b", distinct=True)
    with (
        Tpm.open(a.tpm.tcti) as tpm_a,
        Tpm.open(b.tpm.tcti) as tpm_b,
        BrokerClient(a.config()) as client,
    ):
        ek_a = tpm_a.read_ek()
        ak_b = tpm_b.create_ak()
        challenge = client.start_enrollment("act-a", ek_a.certificate, ek_a.public, ak_b.public, {})
        with pytest.raises(TpmError):
            tpm_b.activate_credential(ak_b, challenge.credential_blob, challenge.encrypted_secret)
        with pytest.raises(EnrollmentRefused, match="activation"):
            client.finish_enrollment(challenge.enrollment_id, b"\x00" * 32)
        # A proof is single-use: the same enrollment cannot be retried with another guess.
        with pytest.raises(EnrollmentRefused):
            client.finish_enrollment(challenge.enrollment_id, b"\x01" * 32)
    with Store.open(broker.directory / "kbs.db") as store:
        assert store.get_node("act-a") is None


def raw_stub(broker: Broker) -> tuple[grpc.Channel, pb_grpc.NodeServiceStub]:
    channel = grpc.secure_channel(
        broker.address, grpc.ssl_channel_credentials(root_certificates=broker.ca.read_bytes())
    )
    return channel, pb_grpc.NodeServiceStub(channel)


@pytest.mark.parametrize(
    "request_fields",
    [
        {"ek_public": b"garbage", "ak_public": b"garbage", "ek_certificate": b"garbage"},
        {"ek_public": b"\x01\x18\x00\x01", "ak_public": b"\x00", "ek_certificate": b"\x30\x03"},
        {"ek_public": b"\x00" * 5000, "ak_public": b"\x00" * 10, "ek_certificate": b"\x30"},
        {"ek_public": b"", "ak_public": b"", "ek_certificate": b""},
    ],
    ids=["garbage", "truncated", "oversized", "empty"],
)
def test_malformed_enrollment_gets_invalid_argument(
    broker: Broker, request_fields: dict[str, Any]
) -> None:
    channel, stub = raw_stub(broker)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.StartEnrollment(
                pb.StartEnrollmentRequest(node_name="junk", **request_fields), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # no node key proves a malformed name
            stub.GetNonce(pb.GetNonceRequest(node_name="../../etc"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_malformed_attestation_gets_invalid_argument_and_broker_keeps_serving(
    broker: Broker, granted: tuple[Node, Enrolled]
) -> None:
    node, me = granted
    ak = me.ak
    channel, _ = raw_stub(broker)
    with channel, session(node) as (tpm, client, _):
        for fields in (
            {"quote": b"\xff" * 300, "signature": b"\x00\x18"},
            {"quote": b"\x00\x10abc", "signature": b"\x00"},
        ):
            nonce = client.get_nonce(me.identity)
            req = pb.AttestRequest(
                node_name=node.name,
                nonce=nonce,
                banks=[pb.PcrBank(bank="sha256", pcrs=[pb.PcrValue(index=0, value=b"\x00" * 32)])],
                **fields,
            )
            with pytest.raises(grpc.RpcError) as info:
                node_call(channel, ATTEST, req, pb.AttestResponse, me.identity)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        nonce = client.get_nonce(me.identity)
        reply = client.attest(me.identity, nonce, fresh_quote(tpm, ak, nonce), b"")
        assert reply.release is not None


def test_event_log_must_replay_to_the_quoted_pcrs(
    broker: Broker, granted: tuple[Node, Enrolled]
) -> None:
    """A boot log that explains the quoted PCRs is accepted; one with an event swapped is denied
    naming the PCR, and nothing is released for it."""
    node, me = granted
    ak = me.ak
    events = [(8, b"grub.cfg"), (9, b"vmlinuz-6.1"), (8, b"console=ttyS0")]
    with session(node) as (tpm, client, _):
        for pcr, data in events:
            tpm.extend_pcr(pcr, data)
        nonce = client.get_nonce(me.identity)
        quote = fresh_quote(tpm, ak, nonce)
        reply = client.attest(me.identity, nonce, quote, build_event_log(events))
        assert reply.release is not None
        forged = build_event_log([(8, b"grub.cfg"), (9, b"vmlinuz-evil"), (8, b"console=ttyS0")])
        nonce = client.get_nonce(me.identity)
        with pytest.raises(AttestationDenied, match="PCR 9"):
            client.attest(me.identity, nonce, fresh_quote(tpm, ak, nonce), forged)
    assert releases(broker, node.name) == 1
    assert any("EventLogMismatch" in d for d in audit_details(broker, node.name))


def test_bad_event_logs_are_refused_specifically_and_the_broker_keeps_serving(
    broker: Broker, granted: tuple[Node, Enrolled]
) -> None:
    """A truncated log and garbage are malformed input (INVALID_ARGUMENT, EventLogInvalid); a log
    in a bank the quote does not cover, or extending a PCR the quote does not cover, does not
    match the quote (EventLogMismatch); a log of 100,000 events (5 MB) is over the message limit
    (the parser's own limit, 10,000 events: tests/kbs/test_eventlog.py). Nothing is released for
    any of them, and a good attestation passes after them. (A log extending a PCR the quote does
    not cover: tests/kbs/test_eventlog.py, since the agent always quotes PCRs 0-23.)"""
    node, me = granted
    ak = me.ak
    events = [(8, b"grub.cfg"), (9, b"vmlinuz-6.1")]
    channel, _ = raw_stub(broker)
    hundred_thousand = build_log([measured(8, 0xD, b"", banks=("sha256",))] * 100_000, ("sha256",))
    with channel, session(node) as (tpm, client, _):
        for pcr, data in events:
            tpm.extend_pcr(pcr, data)
        good = build_event_log(events)
        sha384_only = build_log([measured(p, 0xD, d, banks=("sha384",)) for p, d in events],
                                ("sha384",))  # fmt: skip
        for log, code, error in (
            (good[:-5], grpc.StatusCode.INVALID_ARGUMENT, "truncated in event 2's data"),
            (good + b"\x01\x02", grpc.StatusCode.INVALID_ARGUMENT, "truncated in event 3"),
            (sha384_only, grpc.StatusCode.PERMISSION_DENIED, "carries sha384 digests but the"),
            (hundred_thousand, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        ):  # fmt: skip
            nonce = client.get_nonce(me.identity)
            quote = fresh_quote(tpm, ak, nonce)
            request = pb.AttestRequest(
                node_name=node.name, nonce=nonce, quote=quote.attest, signature=quote.signature,
                banks=[pb.PcrBank(bank=b, pcrs=[pb.PcrValue(index=i, value=v)
                                                for i, v in sorted(values.items())])
                       for b, values in quote.banks.items()],
                event_log=log,
            )  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                node_call(channel, ATTEST, request, pb.AttestResponse, me.identity)
            assert info.value.code() == code, info.value
            assert error in (info.value.details() or ""), info.value.details()
        nonce = client.get_nonce(me.identity)
        reply = client.attest(me.identity, nonce, fresh_quote(tpm, ak, nonce), good)
        assert reply.release is not None
    assert releases(broker, node.name) == 1
    details = audit_details(broker, node.name)
    assert any("EventLogInvalid" in d for d in details)
    assert any("EventLogMismatch" in d and "sha384" in d for d in details)


def test_a_tpm_state_rolled_back_is_denied_naming_the_counters(
    broker: Broker, make_node: NodeFactory, tmp_path: Path
) -> None:
    """The TPM's state file restored from a copy taken two reboots earlier: its quotes are
    genuine and fresh, but resetCount went back. A verdict: denied, keys removed."""
    node = make_node("rolled-back")
    assert node.attest().returncode == 3
    grant_node(broker, node, write_key(tmp_path / "k.pem", rsa.generate_private_key(65537, 2048)))
    state_file = node.tpm.state_dir / "tpm2-00.permall"
    node.tpm.stop()
    snapshot = state_file.read_bytes()
    node.tpm.start()
    node.tpm.restart()
    node.tpm.restart()
    result = node.attest()
    assert result.returncode == 0, result
    node.tpm.stop()
    state_file.write_bytes(snapshot)
    node.tpm.start()
    denied = node.attest()
    assert denied.returncode == 4, denied
    assert "reset/restart counters went back" in denied.stderr
    assert not node.key_file("prod-key").exists()
    assert any("CounterRollback" in d for d in audit_details(broker, node.name))

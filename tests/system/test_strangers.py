"""Nobody off the node can make it lose its keys (issue 10): each attack a stranger on the network
tried, as a named regression test against a real broker subprocess, real swtpms and the real
agent. The stranger calls from another source address (127.0.0.2, through ``SourceProxy``), so
per-peer limits fall on it alone; it knows the node's name and its public EK data, but not the
key only the node's TPM can recover.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.blobs import NodeIdentity
from agent.broker import BrokerClient, WatchKind
from agent.enroll import enrollment_metadata
from agent.errors import BrokerBusy
from agent.state import StateDir
from agent.tpm import Tpm
from harness.broker import Broker
from harness.der import duplicate_extension, malformed_issuer, x400_san
from harness.keys import write_key
from harness.netops import SourceProxy, node_call, secure_channel
from harness.nodes import Node
from harness.operator import grant_node, ok
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1 import qualifying_data
from keylease.api.v1.nodeauth import AUTH_METADATA_KEY, GET_NONCE, WATCH, auth_metadata
from keylease.secret import Secret

NodeFactory = Callable[..., Node]
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, "node call not authenticated")
START_ENROLLMENT = "/keylease.v1.NodeService/StartEnrollment"


@pytest.fixture
def granted(broker: Broker, make_node: NodeFactory, tmp_path: Path) -> Node:
    node = make_node("victim")
    assert node.attest().returncode == 3
    grant_node(broker, node, write_key(tmp_path / "k.pem", rsa.generate_private_key(65537, 2048)))
    ok(node.attest())
    assert len(key_files(node)) == 2
    return node


@pytest.fixture
def stranger(broker: Broker) -> Iterator[grpc.Channel]:
    """A TLS channel to the broker from another address."""
    proxy = SourceProxy(broker.address, "127.0.0.2")
    try:
        with secure_channel(proxy.address, broker.ca) as channel:
            yield channel
    finally:
        proxy.close()


def key_files(node: Node) -> list[Path]:
    return sorted(
        p for d in node.key_dirs if (d / "keylease").is_dir() for p in (d / "keylease").iterdir()
    )


def answer(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), str(exc.details())
    return grpc.StatusCode.OK, ""


def stranger_nonce(
    channel: grpc.Channel, name: str, metadata: tuple[tuple[str, str], ...] | None = None
) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary(
        GET_NONCE, request_serializer=None, response_deserializer=pb.GetNonceResponse.FromString
    )
    raw = pb.GetNonceRequest(node_name=name).SerializeToString()
    return answer(lambda: call(raw, metadata=metadata, timeout=10))


def stranger_watch(
    channel: grpc.Channel, name: str, metadata: tuple[tuple[str, str], ...] | None = None
) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_stream(
        WATCH, request_serializer=None, response_deserializer=pb.WatchEvent.FromString
    )
    raw = pb.WatchRequest(node_name=name).SerializeToString()
    return answer(lambda: next(iter(call(raw, metadata=metadata, timeout=10))))


def guesses(name: str) -> list[tuple[tuple[str, str], ...] | None]:
    """What a stranger can send: no header, a garbled one, one made with a wrong key."""
    wrong = NodeIdentity(name, Secret(os.urandom(32)))
    raw = pb.GetNonceRequest(node_name=name).SerializeToString()
    return [
        None,
        ((AUTH_METADATA_KEY, f"v1 {name} not-base64!"),),
        ((AUTH_METADATA_KEY, "v2 " + name + " " + "A" * 43 + "="),),
        auth_metadata(wrong.key, GET_NONCE, name, raw),
    ]


# --- issue 10, attack 1: GetNonce naming a node evicted the nonce its agent was about to use -----


def test_33_stranger_getnonce_calls_do_not_cost_the_node_its_keys_or_cache(
    granted: Node, stranger: grpc.Channel
) -> None:
    cfg = granted.config()
    identity = granted.identity()
    ak = StateDir.open(cfg.state_dir).load_ak()
    assert ak is not None
    with Tpm.open(cfg.tcti) as tpm, BrokerClient(cfg) as client:
        nonce = client.get_nonce(identity)  # the nonce the agent is about to use
        answers = [stranger_nonce(stranger, granted.name) for _ in range(33)]
        assert answers == [REFUSED] * 33
        reply = client.attest(identity, nonce, tpm.quote(ak, qualifying_data(nonce)), b"")
    assert reply.release is not None
    assert len(key_files(granted)) == 2
    assert (granted.root / "state" / "release.bin").exists()
    for _ in range(33):
        stranger_nonce(stranger, granted.name)
    ok(granted.attest())  # and its next attestation succeeds
    assert len(key_files(granted)) == 2


def test_refusals_tell_a_stranger_nothing_about_which_nodes_exist(
    granted: Node, stranger: grpc.Channel
) -> None:
    """A known node with any wrong credential and an unknown name get one and the same answer,
    on GetNonce and on Watch."""
    for name in (granted.name, "no-such-node"):
        for metadata in guesses(name):
            assert stranger_nonce(stranger, name, metadata) == REFUSED, (name, metadata)
            assert stranger_watch(stranger, name, metadata) == REFUSED, (name, metadata)
    # a valid MAC of the node's, replayed on another method or for another name, proves nothing
    identity = granted.identity()
    raw = pb.GetNonceRequest(node_name=granted.name).SerializeToString()
    stolen = auth_metadata(identity.key, GET_NONCE, granted.name, raw)
    assert stranger_watch(stranger, granted.name, stolen) == REFUSED
    assert stranger_nonce(stranger, "other", stolen) == REFUSED


# --- issue 10, attack 2: GetNonce naming a node spent its rate budget ---------------------------


def test_a_strangers_getnonce_flood_does_not_spend_the_nodes_rate_budget(
    broker: Broker, granted: Node, stranger: grpc.Channel
) -> None:
    broker.restart(rate_limit_node_per_second=1, rate_limit_node_burst=3)
    answers = {stranger_nonce(stranger, granted.name) for _ in range(60)}
    assert answers == {REFUSED}  # refused before the node's bucket is charged
    identity = granted.identity()
    with BrokerClient(granted.config()) as client:
        for _ in range(3):  # its whole burst is still there
            client.get_nonce(identity)
        with pytest.raises(BrokerBusy):
            client.get_nonce(identity)  # ... and it is the node's own calls that spend it


# --- issue 10, attack 5: a stranger's Watch displaced the agent's stream ------------------------


def test_a_strangers_watch_is_refused_and_leaves_the_nodes_stream_alone(
    broker: Broker, granted: Node, stranger: grpc.Channel, tmp_path: Path
) -> None:
    with BrokerClient(granted.config()) as client:
        stream = client.watch(granted.identity())
        events = iter(stream)
        assert next(events).kind is WatchKind.HEARTBEAT
        for _ in range(20):  # far more than MAX_PER_NODE, each would have displaced one
            for metadata in guesses(granted.name):
                assert stranger_watch(stranger, granted.name, metadata) == REFUSED
        key = write_key(tmp_path / "second.pem", rsa.generate_private_key(65537, 2048))
        ok(broker.kbs("key", "import", "second", "--private-key", str(key)))
        ok(broker.kbs("grant", "add", "second", "--selector", "cluster=prod"))
        event = next(events)
        while event.kind is WatchKind.HEARTBEAT:
            event = next(events)
        assert event.kind is WatchKind.CHANGED  # the node's own stream carried the change
        stream.cancel()
    assert broker.log().count(f"watch node={granted.name} started") == 1


# --- enrollment stays open, bounded per EK ------------------------------------------------------


def test_a_startenrollment_flood_with_a_nodes_public_ek_data_does_not_evict_its_challenge(
    broker: Broker, make_node: NodeFactory, stranger: grpc.Channel
) -> None:
    node = make_node("newcomer")
    cfg = node.config()
    with Tpm.open(cfg.tcti) as tpm, BrokerClient(cfg) as client:
        ak = tpm.create_ak()
        ek = tpm.read_ek()
        challenge = client.start_enrollment(
            node.name, ek.certificate, ek.public, ak.public, enrollment_metadata()
        )
        replay = pb.StartEnrollmentRequest(
            node_name=node.name, ek_certificate=ek.certificate, ek_public=ek.public,
            ak_public=ak.public,
        )  # fmt: skip
        codes = [
            answer(lambda: node_call(stranger, START_ENROLLMENT, replay,
                                     pb.StartEnrollmentResponse))[0]
            for _ in range(20)
        ]  # fmt: skip
        secret = tpm.activate_credential(ak, challenge.credential_blob, challenge.encrypted_secret)
        assert client.finish_enrollment(challenge.enrollment_id, secret.reveal()) == "pending"
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 15, codes  # 1/s, burst 5 per EK
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert "too many enrollments for EK" in broker.log()


# --- the broker forgot the node's key: the agent enrolls again, its keys stay -------------------


def test_a_broker_that_no_longer_knows_the_node_key_gets_a_new_enrollment_and_keys_stay(
    broker: Broker, granted: Node
) -> None:
    """UNAUTHENTICATED is no verdict: e.g. a database restored from before the node enrolled.
    The key files are not even rewritten."""
    before = [(p, p.stat().st_ino) for p in key_files(granted)]
    broker.stop()
    with sqlite3.connect(broker.directory / "kbs.db") as db:
        db.execute("UPDATE nodes SET node_key = NULL WHERE name = ?", (granted.name,))
    db.close()
    broker.restart()
    result = granted.attest()
    assert result.returncode == 0, result
    assert "does not accept this node's credentials" in result.stderr
    assert [(p, p.stat().st_ino) for p in key_files(granted)] == before


# --- issue 10, finding 6: crafted EK certificates got INTERNAL with a traceback -----------------


@pytest.mark.parametrize("craft", [duplicate_extension, x400_san, malformed_issuer])
def test_crafted_ek_certificates_get_a_specific_refusal_and_no_traceback(
    broker: Broker,
    make_node: NodeFactory,
    stranger: grpc.Channel,
    craft: Callable[[x509.Certificate, Any], bytes],
) -> None:
    node = make_node("crafted")
    cfg = node.config()
    with Tpm.open(cfg.tcti) as tpm:
        ek, ak = tpm.read_ek(), tpm.create_ak()
    signer = ec.generate_private_key(ec.SECP256R1())
    crafted = craft(x509.load_der_x509_certificate(ek.certificate), signer)
    request = pb.StartEnrollmentRequest(
        node_name=node.name, ek_certificate=crafted, ek_public=ek.public, ak_public=ak.public
    )
    code, details = answer(
        lambda: node_call(stranger, START_ENROLLMENT, request, pb.StartEnrollmentResponse)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("the EK certificate is malformed"), details
    assert stranger_nonce(stranger, "anyone") == REFUSED  # still serving
    assert "Traceback" not in broker.log()
    assert "result=error reason=the EK certificate is malformed" in broker.log()

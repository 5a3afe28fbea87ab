"""What nodes send: node requests through the node service's request parsing, and the boot event
log (parsed, replayed in every bank it carries, then checked against those values, which derives
the boot state's components)."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.message import DecodeError

from kbs.eventlog import EventLogCache, verify_event_log
from kbs.model import check_node_name
from kbs.nodeapi import service
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1.limits import MAX_NODE_NAME
from keylease.eventlog import EventLogError
from keylease.eventlog.parse import parse_event_log
from keylease.eventlog.replay import HASHES, replay
from scripts.fuzz_targets.common import NODE, NONCE, ROOT, harness_ak
from scripts.fuzz_targets.ekcert import ek_seeds

# --- the boot event log ---------------------------------------------------------------------------


def fuzz_event_log(data: bytes) -> None:
    """The broker's reading (the shared parser behind its cache), checked against the values the
    log replays to, so that a parsable log reaches the boot state's derivation."""
    try:
        log = parse_event_log(data)
        quoted = {bank: replay(log, bank) for bank in log.banks if bank in HASHES}
    except EventLogError:
        quoted = {}
    verify_event_log(EventLogCache(1), data, quoted)


def event_log_seeds() -> Iterator[bytes]:
    for path in sorted((ROOT / "tests" / "data" / "eventlogs").glob("*.bin")):
        yield path.read_bytes()


# --- node requests, through the node service's request parsing ---------------------------------
# Input: the method (1 byte), then the request message as it arrives on the wire.

_REQUESTS = (
    pb.StartEnrollmentRequest, pb.FinishEnrollmentRequest, pb.GetNonceRequest,
    pb.AttestRequest, pb.WatchRequest,
)  # fmt: skip


def fuzz_node_requests(data: bytes) -> None:
    if not data:
        return
    kind = _REQUESTS[data[0] % len(_REQUESTS)]
    try:
        request = kind.FromString(data[1:])
    except DecodeError:
        return  # refused by gRPC's deserializer before any of our code runs
    if isinstance(request, pb.StartEnrollmentRequest):
        enrollment = service._enrollment_request(request)
        check_node_name(enrollment.node_name)
    elif isinstance(request, pb.FinishEnrollmentRequest):
        service._bounded("enrollment_id", request.enrollment_id, 64)
        service._bounded("secret", request.secret, 64)
    elif isinstance(request, pb.AttestRequest):
        check_node_name(service._evidence(request).node_name)
    else:
        service._bounded("node_name", request.node_name, MAX_NODE_NAME)
        check_node_name(request.node_name)


def request_seeds() -> Iterator[bytes]:
    _, ak, ek = harness_ak()
    yield bytes([0]) + pb.StartEnrollmentRequest(
        node_name=NODE, ek_certificate=next(ek_seeds()), ek_public=ek.raw, ak_public=ak.raw,
        metadata={"os": "debian"},
    ).SerializeToString()  # fmt: skip
    yield (
        bytes([1])
        + pb.FinishEnrollmentRequest(enrollment_id="e" * 32, secret=b"s" * 32).SerializeToString()
    )
    yield bytes([2]) + pb.GetNonceRequest(node_name=NODE).SerializeToString()
    yield bytes([3]) + pb.AttestRequest(
        node_name=NODE, nonce=NONCE, quote=b"q" * 100, signature=b"s" * 70,
        banks=[pb.PcrBank(bank="sha256", pcrs=[pb.PcrValue(index=i, value=bytes(32))
                                               for i in range(8)])],
        event_log=b"log",
    ).SerializeToString()  # fmt: skip
    yield bytes([4]) + pb.WatchRequest(node_name=NODE).SerializeToString()

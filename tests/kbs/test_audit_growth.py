"""Bounded audit growth (issue 10): refusals that prove no node identity are a metric and a
throttled log line, not audit rows; audit rows older than ``audit_retention_days`` are deleted."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from harness.broker import Broker
from harness.netops import metrics_port, node_stub, scrape, secure_channel
from kbs import errors as e
from kbs.config import load_config
from kbs.errors import ConfigError
from kbs.nodeapi.refusals import PROVEN_REFUSALS, ThrottledLog, proves_identity
from kbs.store import Store
from keylease.api.v1 import keylease_pb2 as pb


def audit_rows(broker: Broker) -> int:
    with Store.open(broker.directory / "kbs.db") as store:
        return len(store.list_audit(limit=100_000))


def unproven(broker: Broker, event: str, reason: str) -> float:
    key = ("keylease_unproven_refusals_total", frozenset({("event", event), ("reason", reason)}))
    return scrape(metrics_port(broker)).get(key, 0.0)


def test_refusals_anyone_can_cause_leave_no_audit_rows(broker: Broker) -> None:
    before = audit_rows(broker)
    with secure_channel(broker.address, broker.ca) as channel:
        stub = node_stub(channel)
        for i in range(300):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetNonce(pb.GetNonceRequest(node_name=f"ghost-{i}"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for i in range(50):
            request = pb.AttestRequest(
                node_name=f"ghost-{i}", nonce=b"n" * 32, quote=b"q", signature=b"s",
                banks=[pb.PcrBank(bank="sha256", pcrs=[pb.PcrValue(index=0, value=b"\0" * 32)])],
            )  # fmt: skip
            with pytest.raises(grpc.RpcError):
                stub.Attest(request, timeout=10)
    assert audit_rows(broker) == before
    key = ("keylease_requests_limited_total", frozenset({("limit", "unauthenticated")}))
    assert scrape(metrics_port(broker)).get(key, 0.0) == 350
    assert broker.log().count("not authenticated") <= 2  # one summary line per 10 s


def test_audit_rows_past_the_retention_are_deleted_by_the_broker(
    broker: Broker, tmp_path: Path
) -> None:
    broker.stop()
    now = datetime.now(UTC)
    with Store.open(broker.directory / "kbs.db") as store:
        for days in (400, 40, 10, 0):
            store.audit(actor="operator:t", event="e", node=None, result="ok",
                        detail=f"{days} days ago", now=now - timedelta(days=days))  # fmt: skip
    broker.restart(audit_retention_days=30)
    deadline = time.monotonic() + 10
    while "audit retention: deleted 2 row(s) older than 30 days" not in broker.log():
        assert time.monotonic() < deadline, broker.log()
        time.sleep(0.1)
    with Store.open(broker.directory / "kbs.db") as store:
        assert [a.detail for a in store.list_audit()] == ["10 days ago", "0 days ago"]
    pruned = scrape(metrics_port(broker))[("keylease_audit_rows_pruned_total", frozenset())]
    assert pruned == 2


def test_audit_retention_setting(tmp_path: Path) -> None:
    path = tmp_path / "kbs.toml"
    path.write_text("")
    assert load_config(path).audit_retention_days == 90
    path.write_text("audit_retention_days = 0\n")
    assert load_config(path).audit_retention_days == 0  # keep everything
    path.write_text("audit_retention_days = -1\n")
    with pytest.raises(ConfigError, match="audit_retention_days` must be an integer from 0"):
        load_config(path)


def test_only_authenticated_calls_and_verified_quotes_prove_identity() -> None:
    """Every refusal of an authenticated call (GetNonce, Attest, Watch: admission let it through
    only with the node's MAC) is an audit row; at enrollment only what a verified quote proves."""
    classes = [c for c in vars(e).values() if isinstance(c, type)]
    assert {c for c in classes if issubclass(c, e.AttestationFailed)} >= PROVEN_REFUSALS
    for event in ("nonce", "attest", "watch"):
        assert proves_identity(event, e.NonceUnknown("x"))
        assert proves_identity(event, e.InvalidRequest("x"))
    assert proves_identity("enroll", e.PolicyDenied("x"))
    for anyone in (e.UnknownNode("x"), e.NonceUnknown("x"), e.IncorrectSignature("x"),
                   e.QualifyingDataMismatch("x"), e.UntrustedEk("x"), e.NodeEkConflict("x"),
                   e.ActivationFailed("x"), e.InvalidRequest("x"), e.NodeRevoked("x")):  # fmt: skip
        assert not proves_identity("enroll", anyone), anyone


def test_throttled_log_writes_one_line_per_kind_and_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    logger = logging.getLogger("test.throttled")
    throttled = ThrottledLog(logger, interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.throttled"):
        assert throttled.log(logging.INFO, "a", "refused %s", 1)
        for i in range(99):
            assert not throttled.log(logging.INFO, "a", "refused %s", i)
        assert throttled.log(logging.INFO, "b", "other")  # its own kind
        now[0] = 10.0
        assert throttled.log(logging.INFO, "a", "refused %s", 100)
    assert [r.getMessage() for r in caplog.records] == [
        "refused 1",
        "other",
        "refused 100 (and 99 more like it in the last 10 s)",
    ]

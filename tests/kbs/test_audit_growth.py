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
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        for i in range(50):
            request = pb.AttestRequest(
                node_name=f"ghost-{i}", nonce=b"n" * 32, quote=b"q", signature=b"s",
                pcr_bank="sha256", pcrs=[pb.PcrValue(index=0, value=b"\0" * 32)],
            )  # fmt: skip
            with pytest.raises(grpc.RpcError):
                stub.Attest(request, timeout=10)
    assert audit_rows(broker) == before
    assert unproven(broker, "nonce", "UnknownNode") == 300
    assert unproven(broker, "attest", "UnknownNode") == 50
    log = broker.log()
    assert log.count("result=error reason=node 'ghost-") <= 2  # one line per 10 s and kind


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


def test_only_refusals_after_a_verified_quote_prove_identity() -> None:
    classes = [c for c in vars(e).values() if isinstance(c, type)]
    assert {c for c in classes if issubclass(c, e.AttestationFailed)} >= PROVEN_REFUSALS
    assert proves_identity(e.PolicyDenied("x"))
    assert proves_identity(e.PcrDigestMismatch("x"))
    for anyone in (e.UnknownNode("x"), e.NonceUnknown("x"), e.IncorrectSignature("x"),
                   e.QualifyingDataMismatch("x"), e.UntrustedEk("x"), e.NodeEkConflict("x"),
                   e.ActivationFailed("x"), e.InvalidRequest("x"), e.NodeRevoked("x")):  # fmt: skip
        assert not proves_identity(anyone), anyone


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

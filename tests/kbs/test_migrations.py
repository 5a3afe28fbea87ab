"""Migrations: a database written before Alembic (``schema_version`` 1 or 2, the exact DDL of
that code, below) upgrades in place with its rows intact, as does one at revision 0002 (gaining
``admin_revocations``, then policy documents: an old PCR-value policy becomes raw ``pcr.N``
rules, a node's PCR values move under their bank) and one at 0003 (gaining key versions: SQLite
and PostgreSQL); a newer revision and a file that is not a database are refused; SQLite files are
private, WAL, shared by threads and processes."""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from harness.postgres import postgres_fixture  # noqa: F401
from kbs.errors import StoreError
from kbs.model import ChangeKind, KeyState, NodeState
from kbs.policy.rules import AllowedValue, Rule
from kbs.store import AdminRevocation, AuditEvent, ReleaseBinding, Store
from kbs.store.database import Database
from kbs.store.migrate import HEAD_REVISION, MIGRATIONS
from tests.kbs.test_store import database_fixture, enroll  # noqa: F401

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
EK_A = "a" * 64
MIGRATED = "from the PCR policy before components (migration 0004)"

# The schema as keylease-kbs wrote it before Alembic (kbs/store_db.py at commit c2f9186), frozen.
LEGACY_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE nodes (
            name TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'revoked')),
            labels TEXT NOT NULL DEFAULT '{}',
            ek_hash TEXT NOT NULL UNIQUE,
            ek_public BLOB NOT NULL,
            ek_certificate BLOB NOT NULL,
            ak_public BLOB NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            enrolled_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            last_attested_at TEXT,
            pcr_bank TEXT,
            pcrs TEXT NOT NULL DEFAULT '{}',
            reset_count INTEGER,
            restart_count INTEGER)""",
        """CREATE TABLE nonces (
            nonce BLOB PRIMARY KEY,
            node_name TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
            expires_at TEXT NOT NULL)""",
        "CREATE INDEX nonces_node ON nonces (node_name, expires_at)",
        """CREATE TABLE enrollments (
            id TEXT PRIMARY KEY,
            node_name TEXT NOT NULL,
            ek_public BLOB NOT NULL,
            ek_certificate BLOB NOT NULL,
            ak_public BLOB NOT NULL,
            ek_hash TEXT NOT NULL,
            secret_sha256 BLOB NOT NULL,
            metadata TEXT NOT NULL,
            expires_at TEXT NOT NULL)""",
        "CREATE INDEX enrollments_node ON enrollments (node_name, expires_at)",
        "CREATE TABLE allowlist (ek_hash TEXT PRIMARY KEY, added_at TEXT NOT NULL)",
        """CREATE TABLE keys (
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            algorithm TEXT NOT NULL,
            encrypted_private BLOB NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (name, version))""",
        """CREATE TABLE grants (
            key_name TEXT NOT NULL,
            selector TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (key_name, selector))""",
        """CREATE TABLE policies (
            name TEXT PRIMARY KEY,
            pcr_bank TEXT NOT NULL,
            pcrs TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE policy_assignments (
            policy_name TEXT NOT NULL REFERENCES policies(name) ON DELETE CASCADE,
            selector TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (policy_name, selector))""",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            event TEXT NOT NULL,
            node TEXT,
            result TEXT NOT NULL,
            detail TEXT NOT NULL)""",
        "CREATE INDEX audit_node ON audit (node, id)",
    ),
    (  # 2: the change feed behind the Watch stream (kbs.store.changes)
        """CREATE TABLE changes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            node TEXT,
            kind TEXT NOT NULL CHECK (kind IN ('revoked', 'changed')),
            reason TEXT NOT NULL)""",
        "CREATE INDEX changes_at ON changes (at)",
    ),
)


def legacy_database(path: Path, version: int) -> None:
    """A database exactly as the pre-Alembic code left it at ``version``, with a few rows."""
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        for statements in LEGACY_MIGRATIONS[:version]:
            for statement in statements:
                raw.execute(statement)
        raw.execute(
            "INSERT INTO nodes (name, state, labels, ek_hash, ek_public, ek_certificate, "
            "ak_public, enrolled_at, updated_at, last_attested_at, pcr_bank, pcrs) "
            "VALUES ('n1', 'approved', ?, ?, x'01', x'02', x'03', ?, ?, ?, 'sha256', ?)",
            ('{"cluster":"prod"}', EK_A, T0.isoformat(), T0.isoformat(), T0.isoformat(),
             '{"7":"' + "07" * 32 + '"}'),
        )  # fmt: skip
        raw.execute(
            "INSERT INTO keys VALUES ('k', 1, 'EC-P256', x'c1', ?), ('k', 2, 'EC-P256', x'c2', ?)",
            (T0.isoformat(), T0.isoformat()),
        )
        raw.execute(
            "INSERT INTO grants VALUES ('k', '{\"cluster\":\"prod\"}', ?)", (T0.isoformat(),)
        )
        raw.execute(
            "INSERT INTO policies VALUES ('boot', 'sha256', ?, ?)",
            ('{"0":"' + "00" * 32 + '","7":"' + "07" * 32 + '"}', T0.isoformat()),
        )
        raw.execute(
            "INSERT INTO policy_assignments VALUES ('boot', '{\"cluster\":\"prod\"}', ?)",
            (T0.isoformat(),),
        )
        raw.execute(
            "INSERT INTO nonces VALUES (x'aa', 'n1', ?)", ((T0 + timedelta(minutes=1)).isoformat(),)
        )
        raw.execute(
            "INSERT INTO audit (at, actor, event, node, result, detail) "
            "VALUES (?, 'node:n1', 'attest', 'n1', 'ok', 'old')",
            (T0.isoformat(),),
        )
        if version >= 2:
            raw.execute(
                "INSERT INTO changes (at, node, kind, reason) VALUES (?, 'n1', 'changed', 'x')",
                (T0.isoformat(),),
            )
    raw.close()


@pytest.mark.parametrize("version", [1, 2])
def test_a_pre_alembic_database_upgrades_in_place(tmp_path: Path, version: int) -> None:
    path = tmp_path / "kbs.db"
    legacy_database(path, version)
    with Store.open(path) as store:
        assert store.schema_version() == HEAD_REVISION
        node = store.get_node("n1")
        assert node is not None
        assert (node.state, node.labels, node.ek_public, node.pcr_banks) == (
            NodeState.APPROVED, {"cluster": "prod"}, b"\x01", {"sha256": {7: b"\x07" * 32}}
        )  # fmt: skip
        assert node.boot_log_digest is None
        assert node.last_denial is None
        (policy,) = store.policies_for_labels({"cluster": "prod"})
        assert (policy.name, policy.pcr_bank) == ("boot", "sha256")
        assert [(r.component, r.allowed) for r in policy.rules] == [
            ("pcr.0", (AllowedValue("00" * 32, MIGRATED),)),
            ("pcr.7", (AllowedValue("07" * 32, MIGRATED),)),
        ]
        assert node.last_attested_at == T0
        assert [(k.name, k.version, k.encrypted_private) for k in store.keys_for_labels(
            {"cluster": "prod"})] == [("k", 2, b"\xc2")]  # fmt: skip
        assert [e.detail for e in store.list_audit()] == ["old"]
        store.consume_nonce("n1", b"\xaa", T0)  # the nonce issued before the upgrade still works
        old_changes = len(store.changes_since(0))
        assert old_changes == (1 if version == 2 else 0)
        assert store.last_change_id() == old_changes
        store.revoke_node("n1", T0)
        assert store.changes_since(old_changes)[0].kind is ChangeKind.REVOKED
        store.audit(actor="a", event="e", node=None, result="ok", detail="new", now=T0)
        assert [e.detail for e in store.list_audit()] == ["old", "new"]
    with sqlite3.connect(path) as raw:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    raw.close()
    assert "schema_version" not in tables
    assert {"alembic_version", "admin_revocations"} <= tables
    with Store.open(path) as store:  # and opens again unchanged
        assert store.schema_version() == HEAD_REVISION
        assert len(store.list_nodes()) == 1


def test_migrates_an_empty_database_file(tmp_path: Path) -> None:
    path = tmp_path / "kbs.db"
    path.write_bytes(b"")
    with Store.open(path) as store:
        assert store.schema_version() == HEAD_REVISION
        assert store.list_nodes() == []
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    raw.close()
    assert {"nodes", "nonces", "enrollments", "keys", "grants", "policies", "audit",
            "admin_revocations"} <= tables  # fmt: skip


Sql = tuple[str, Mapping[str, object]]


def at_revision(database: Path | str, revision: str, *statements: Sql) -> None:
    """A database as revision ``revision`` of the migrations left it, with ``statements``
    (SQL text, parameters) run on it."""
    db = Database.connect(database)
    try:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with db.tx() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            for sql, params in statements:
                conn.execute(sa.text(sql), params)
    finally:
        db.close()


NODE_N1: Sql = (
    "INSERT INTO nodes (name, state, labels, ek_hash, ek_public, ek_certificate, ak_public, "
    "metadata, enrolled_at, updated_at, pcrs) VALUES ('n1', 'approved', :labels, :ek, :b, :b, "
    ":b, '{}', :at, :at, '{}')",
    {"labels": '{"cluster":"prod"}', "ek": EK_A, "b": b"\x01", "at": T0.isoformat()},
)


def test_a_revision_0002_database_gains_admin_revocations_and_policy_documents(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kbs.db"
    at_revision(path, "0002")
    with sqlite3.connect(path) as raw:  # rows as the code of revision 0002 wrote them
        raw.execute(
            "INSERT INTO nodes (name, state, labels, ek_hash, ek_public, ek_certificate, "
            "ak_public, metadata, enrolled_at, updated_at, pcr_bank, pcrs) VALUES ('n1', "
            "'approved', '{}', ?, x'01', x'02', x'03', '{}', ?, ?, 'sha256', ?)",
            (EK_A, T0.isoformat(), T0.isoformat(), '{"4":"' + "04" * 32 + '"}'),
        )
        raw.execute("INSERT INTO keys VALUES ('k', 1, 'EC-P256', x'c1', ?)", (T0.isoformat(),))
        raw.execute(
            "INSERT INTO policies VALUES ('old', 'sha256', ?, ?)",
            ('{"4":"' + "04" * 32 + '"}', T0.isoformat()),
        )
    raw.close()
    with Store.open(path) as store:
        assert store.schema_version() == HEAD_REVISION
        node = store.get_node("n1")
        assert node is not None
        assert node.pcr_banks == {"sha256": {4: b"\x04" * 32}}
        (policy,) = store.list_policies()
        assert policy.rules == (Rule("pcr.4", (AllowedValue("04" * 32, MIGRATED),)),)
        assert store.boot_record("n1") is None
        assert [n.name for n in store.list_nodes()] == ["n1"]
        key = store.get_key("k")
        assert key is not None
        assert key.encrypted_private == b"\xc1"
        audit = AuditEvent("operator:t", "admin-cert-revoke", None, "ok", "alice")
        store.add_admin_revocations([AdminRevocation("ab", "alice", T0)], audit, T0)
        assert store.admin_revocation("ab") == AdminRevocation("ab", "alice", T0)


def test_a_revision_0003_database_keeps_releasing_exactly_what_it_released(
    database: Path | str,
) -> None:
    """Before key versions, only a key's newest version was released. Upgraded in place, every
    older version is retired (at the time of the upgrade), so no node receives a key it was not
    receiving; nodes hold nothing recorded until their next release."""
    at = T0.isoformat()
    at_revision(
        database,
        "0003",
        NODE_N1,
        *(
            ("INSERT INTO keys VALUES (:n, :v, 'EC-P256', :c, :at)",
             {"n": n, "v": v, "c": f"{n}{v}".encode(), "at": at})
            for n, v in (("k", 1), ("k", 2), ("k", 3), ("single", 1))
        ),
        ("INSERT INTO grants VALUES ('k', :s, :at), ('single', :s, :at)",
         {"s": '{"cluster":"prod"}', "at": at}),
    )  # fmt: skip
    before = datetime.now(UTC)
    with Store.open(database) as store:
        assert store.schema_version() == HEAD_REVISION
        released = store.keys_for_labels({"cluster": "prod"})
        assert [(k.name, k.version, k.encrypted_private) for k in released] == [
            ("k", 3, b"k3"), ("single", 1, b"single1")
        ]  # fmt: skip
        listed = store.list_keys()
        assert [(k.name, k.version, k.state) for k in listed] == [
            ("k", 1, KeyState.RETIRED), ("k", 2, KeyState.RETIRED), ("k", 3, KeyState.CURRENT),
            ("single", 1, KeyState.CURRENT),
        ]  # fmt: skip
        for key in listed[:2]:
            assert key.retired_at is not None
            assert before - timedelta(seconds=5) < key.retired_at <= datetime.now(UTC)
        assert store.key_details("k", T0).holders == ()
        store.record_attestation("n1", banks={"sha256": {}}, reset_count=None,
                                 restart_count=None, now=T0, held=[("k", 3)],
                                 lease_until=T0 + timedelta(hours=1))  # fmt: skip
        assert [h.node for h in store.key_details("k", T0).holders] == ["n1"]


def revert_0008(raw: sqlite3.Connection) -> None:
    """Undo what revision 0008 added (approved states)."""
    raw.execute("DROP TABLE approved_states")
    for column in ("approval_limit", "release_group", "release_signer"):
        raw.execute(f"ALTER TABLE nodes DROP COLUMN {column}")
    raw.execute("ALTER TABLE changes DROP COLUMN payload")


def test_a_revision_0007_database_gains_approved_states(tmp_path: Path) -> None:
    """Nodes released before approvals keep their rows, bound to nothing yet: their next release
    records the binding and their first approved state."""
    path = tmp_path / "kbs.db"
    with Store.open(path) as store:
        enroll(store, "n1", EK_A)
        store.add_change("n1", ChangeKind.CHANGED, "before the upgrade", T0)
    with sqlite3.connect(path) as raw:  # back to what revision 0007 left
        revert_0008(raw)
        raw.execute("UPDATE alembic_version SET version_num = '0007_audit_retention'")
    raw.close()
    with Store.open(path) as store:
        assert store.schema_version() == HEAD_REVISION
        node = store.get_node("n1")
        assert node is not None
        assert (node.approval_limit, node.release_group, node.release_signer) == (None,) * 3
        assert store.approved_states("n1") == []
        assert [(c.reason, c.payload) for c in store.changes_since(0)] == [
            ("before the upgrade", None)
        ]
        store.record_attestation(
            "n1", banks={"sha256": {0: bytes(32)}}, reset_count=1, restart_count=0, now=T0,
            held=[], binding=ReleaseBinding(5000, "p", "f" * 64), states=[],
        )  # fmt: skip
        node = store.get_node("n1")
        assert node is not None
        assert (node.approval_limit, node.release_group, node.release_signer) == (
            5000,
            "p",
            "f" * 64,
        )


def test_a_revision_0005_database_gains_node_keys(tmp_path: Path) -> None:
    """Nodes enrolled before node keys keep their rows, without a key: their calls are refused
    until their agents enroll again (which stores one)."""
    path = tmp_path / "kbs.db"
    with Store.open(path) as store:
        enroll(store, "n1", EK_A)
    with sqlite3.connect(path) as raw:  # back to what revision 0005 left
        revert_0008(raw)
        raw.execute("DROP INDEX audit_at")
        raw.execute("ALTER TABLE nodes DROP COLUMN node_key")
        raw.execute("UPDATE alembic_version SET version_num = '0005_key_versions'")
    raw.close()
    with Store.open(path) as store:
        assert store.schema_version() == HEAD_REVISION
        assert [n.name for n in store.list_nodes()] == ["n1"]
        assert store.node_key("n1") is None
        store.enroll_node(
            name="n1", ek_hash=EK_A, ek_public=b"ek", ek_certificate=b"cert", ak_public=b"ak2",
            state=NodeState.APPROVED, metadata={}, now=T0, node_key=b"sealed key",
        )  # fmt: skip
        assert store.node_key("n1") == b"sealed key"


def test_a_revision_0006_database_gains_the_audit_time_index(tmp_path: Path) -> None:
    path = tmp_path / "kbs.db"
    with Store.open(path) as store:
        store.audit(actor="a", event="e", node=None, result="ok", detail="old", now=T0)
    with sqlite3.connect(path) as raw:  # back to what revision 0006 left
        revert_0008(raw)
        raw.execute("DROP INDEX audit_at")
        raw.execute("UPDATE alembic_version SET version_num = '0006_node_keys'")
    raw.close()
    with Store.open(path) as store:
        assert store.schema_version() == HEAD_REVISION
        assert store.prune_audit(T0 + timedelta(seconds=1)) == 1
    with sqlite3.connect(path) as raw:
        plan = raw.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM audit WHERE at < '2026' ORDER BY at LIMIT 5"
        ).fetchall()
    raw.close()
    assert "audit_at" in str(plan)


def test_newer_schema_and_garbage_are_refused(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.db"
    legacy_database(legacy, 2)
    with sqlite3.connect(legacy) as raw:
        raw.execute("UPDATE schema_version SET version = 99")
    raw.close()
    with pytest.raises(StoreError, match=r"schema version 99, newer.*upgrade keylease-kbs"):
        Store.open(legacy)
    path = tmp_path / "kbs.db"
    Store.open(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE alembic_version SET version_num = '9999'")
    raw.close()
    with pytest.raises(StoreError, match=r"schema revision 9999, newer.*upgrade keylease-kbs"):
        Store.open(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database file at all" * 200)
    with pytest.raises(StoreError, match=r"junk\.db"):
        Store.open(junk)
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "missing-dir" / "kbs.db")
    with pytest.raises(StoreError, match="postgresql:// URL"):
        Store.open("mysql://x")


def test_persists_across_reopen_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "kbs.db"
    with Store.open(path) as store:
        enroll(store, "n1", EK_A)
        store.approve_node("n1", {"cluster": "prod"}, T0)
        store.add_key("k", "EC-P256", b"ciphertext", T0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Store.open(path) as store:
        node = store.get_node("n1")
        assert node is not None
        assert node.labels == {"cluster": "prod"}
        key = store.get_key("k")
        assert key is not None
        assert key.encrypted_private == b"ciphertext"


def test_threads_and_a_second_process_handle_share_the_database(tmp_path: Path) -> None:
    path = tmp_path / "kbs.db"
    with Store.open(path) as server, Store.open(path) as operator:
        enroll(server, "n1", EK_A)
        errors: list[BaseException] = []

        def issue(offset: int) -> None:
            try:
                for i in range(20):
                    server.add_nonce("n1", bytes([offset, i]) * 16, T0 + timedelta(hours=1))
                    server.consume_nonce("n1", bytes([offset, i]) * 16, T0)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=issue, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for i in range(10):
            operator.audit(actor="operator:t", event="e", node=None, result="ok", detail=str(i),
                           now=T0)  # fmt: skip
        for t in threads:
            t.join()
        assert errors == []
        assert len(server.list_audit(limit=100)) == 10

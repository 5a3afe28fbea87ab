"""The broker's approvals: predictions from real OVMF boot logs, what a widened policy approves
for which nodes (a real SQLite store, the broker's real signing keys from `keylease-kbs init`),
what a release signs again and what a narrowed policy no longer signs, and key rotation."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from harness.broker import Broker
from kbs.admin.policies import PolicyAdmin
from kbs.approvals.predict import Swap, canary_swap, predict, value_swap
from kbs.approvals.states import allowed, new_state, policy_group
from kbs.approvals.widen import widened
from kbs.config import load_config
from kbs.errors import ConfigError
from kbs.model import ChangeKind, Policy
from kbs.policy import learn
from kbs.policy.evaluate import evaluate
from kbs.policy.rules import AllowedValue, Document, Rule
from kbs.signing import SigningKeys, load_signing_keys
from kbs.store import BootUpdate, ReleaseBinding, Store
from keylease.api.v1.approvals import decode_approvals, verify_approval
from keylease.eventlog import analyse
from keylease.eventlog.bootstate import BootState
from tests.kbs.test_store import enroll

DATA = Path(__file__).resolve().parents[1] / "data" / "eventlogs"
T0 = datetime.now(UTC)  # the signing certificates are made now: valid from an hour ago
LIMIT = 7_200_000


def boot(name: str) -> tuple[BootState, dict[int, bytes]]:
    """A committed OVMF boot: its boot state (sha256) and the PCR values its quote had."""
    log = DATA / f"ovmf-{name}.bin"
    meta = json.loads(log.with_suffix(".json").read_text())
    quoted = {int(i): bytes.fromhex(v) for i, v in meta["pcrs"]["sha256"].items()}
    return analyse(log.read_bytes()).states["sha256"], quoted


def test_the_changed_command_line_is_predicted_from_the_base_log() -> None:
    """The VM's base boot and its boot with another kernel command line (captured from the
    project's OVMF VM): replaying the base log with the canary's command-line event, or with the
    newly allowed digest, gives exactly the PCRs the changed boot quoted."""
    base, base_pcrs = boot("base")
    changed, changed_pcrs = boot("cmdline")
    layout = {m.component for m in base.layout}
    assert {"firmware", "boot-app.1", "kernel-cmdline"} <= layout  # the VM boots no initrd
    touched = base.touched  # PCR 10 (IMA, the kernel's) differs from boot to boot: no policy
    expected = {i: changed_pcrs[i] for i in touched}

    def predicted(*swaps: Swap | None) -> dict[int, bytes]:
        assert None not in swaps
        values = predict(base, base_pcrs, [s for s in swaps if s is not None])
        assert values is not None
        return {i: values[i] for i in touched}

    assert predicted(canary_swap(changed, "kernel-cmdline", changed_pcrs)) == expected
    new_value = changed.get("kernel-cmdline")
    assert new_value is not None
    assert predicted(value_swap(base, "kernel-cmdline", new_value.value)) == expected
    assert predict(base, base_pcrs, []) == base_pcrs  # the log replays to its own quote
    firmware = value_swap(base, "firmware", "ab" * 32)  # a whole-PCR component: PCR 0 only
    assert firmware is not None
    assert predict(base, base_pcrs, [firmware]) == {**base_pcrs, 0: bytes.fromhex("ab" * 32)}
    assert value_swap(base, "secure-boot", "on") is None  # not a measurement


@pytest.fixture
def signing(tmp_path: Path, ek_roots: Path) -> tuple[SigningKeys, x509.Certificate]:
    """The broker's signing keys as `keylease-kbs init` makes them, and its CA."""
    broker = Broker(tmp_path / "kbs", ek_roots)
    cfg = load_config(broker.config)
    return load_signing_keys(cfg), x509.load_pem_x509_certificate(cfg.admin_ca.read_bytes())


def released(store: Store, name: str, state: str, labels: dict[str, str], group: str,
             signer: str) -> None:  # fmt: skip
    """A node whose last verified boot is ``state`` and whose cache is bound to ``group``."""
    enroll(store, name, hashlib.sha256(name.encode()).hexdigest())
    store.approve_node(name, labels, T0)
    found, quoted = boot(state)
    log = (DATA / f"ovmf-{state}.bin").read_bytes()
    store.record_attestation(
        name, banks={"sha256": quoted}, reset_count=1, restart_count=0, now=T0,
        boot=BootUpdate(hashlib.sha256(log).hexdigest(), {"sha256": found}),
        binding=ReleaseBinding(LIMIT, group, signer),
    )  # fmt: skip


def test_a_widened_policy_approves_the_canarys_state_for_every_node_it_concerns(
    tmp_path: Path, signing: tuple[SigningKeys, x509.Certificate]
) -> None:
    keys, ca = signing
    fp = keys.current.fingerprint
    with Store.open(tmp_path / "kbs.db") as store:
        released(store, "n1", "base", {"role": "vm"}, "vm-boot", fp)
        released(store, "n2", "base", {"role": "vm"}, "vm-boot", fp)
        released(store, "stale", "base", {"role": "vm"}, "old-group", fp)  # cache bound elsewhere
        released(store, "rotated", "base", {"role": "vm"}, "vm-boot", "0" * 64)  # key not kept
        released(store, "lab", "base", {"role": "lab"}, "vm-boot", fp)  # not this policy's
        released(store, "canary", "cmdline", {"role": "vm"}, "vm-boot", fp)
        n1 = store.get_node("n1")
        assert n1 is not None
        document = learn.learn(n1, store.boot_record("n1"), "sha256", None, T0)
        store.put_policy("vm-boot", document, T0, [{"role": "vm"}])
        last = store.last_change_id()
        admin = PolicyAdmin(store, "operator:test", lambda: T0, lambda: keys)
        change = admin.allow("vm-boot", "canary", ["kernel-cmdline"])
        assert [line[:18] for line in change.changes] == ["+ kernel-cmdline: "]
        pushed = {c.node: c.payload for c in store.changes_since(last)}
        assert {n for n, p in pushed.items() if p} == {"n1", "n2"}
        _, cmdline_pcrs = boot("cmdline")
        for name in ("n1", "n2"):
            payload = pushed[name]
            assert payload is not None
            approvals = decode_approvals(payload, ValueError)
            assert approvals, name
            for a in approvals:
                verify_approval(a, [ca], ValueError)
                assert (a.node_name, a.policy_group, a.clock_limit) == (name, "vm-boot", LIMIT)
                assert a.values == {i: cmdline_pcrs[i] for i in a.indices}
            assert {a.origin for a in approvals} == {"canary canary"}  # prediction: the same
            states = store.approved_states(name)
            assert [s.origin for s in states] == ["canary canary"]
        assert all(c.kind is ChangeKind.CHANGED for c in store.changes_since(last))
        # the same allow again changes nothing and pushes nothing
        last = store.last_change_id()
        assert admin.allow("vm-boot", "canary", ["kernel-cmdline"]).changes == ()
        assert store.changes_since(last) == []


def test_a_narrowed_policy_no_longer_approves_what_it_dropped(tmp_path: Path) -> None:
    """What a release signs again is evaluated against the node's policies now."""
    base, base_pcrs = boot("base")
    changed, changed_pcrs = boot("cmdline")
    node_like = {"sha256": base_pcrs}
    seen = base.get("kernel-cmdline")
    assert seen is not None
    doc = Document("sha256", (Rule("kernel-cmdline", (AllowedValue(seen.value),)),))
    policy = Policy("vm-boot", doc, ({"role": "vm"},))
    sealing = evaluate([policy], node_like, {"sha256": base})
    state = new_state(sealing, base, [policy], "verified", T0)
    assert allowed(state, [policy]) == sealing
    cmdline = changed.get("kernel-cmdline")
    assert cmdline is not None
    both = (*doc.rules[0].allowed, AllowedValue(cmdline.value, "canary"))
    wider = Policy("vm-boot", Document("sha256", (Rule("kernel-cmdline", both),)), policy.selectors)
    assert set(widened(doc, wider.document)) == {"kernel-cmdline"}
    other = new_state(evaluate([wider], {"sha256": changed_pcrs}, {"sha256": changed}), changed,
                      [wider], "canary", T0)  # fmt: skip
    assert allowed(other, [wider]) is not None
    assert allowed(other, [policy]) is None  # narrowed back: not signed again
    assert policy_group([wider, Policy("a", doc, ())]) == "a,vm-boot"


def test_approval_ttl_is_at_most_the_lease(tmp_path: Path, ek_roots: Path) -> None:
    broker = Broker(tmp_path / "kbs", ek_roots)
    broker.set(lease_seconds=600, approval_ttl_seconds=900)
    with pytest.raises(ConfigError, match=r"approval_ttl_seconds.*1 to 600"):
        load_config(broker.config)
    broker.set(approval_ttl_seconds=300)
    assert load_config(broker.config).approval_ttl_seconds == 300
    broker.set(lease_seconds=1200)
    text = broker.config.read_text().replace("approval_ttl_seconds = 300\n", "")
    broker.config.write_text(text)
    assert load_config(broker.config).approval_ttl_seconds == 1200  # default: the lease


def test_a_rotated_signing_key_is_kept_for_the_caches_bound_to_it(
    tmp_path: Path, ek_roots: Path
) -> None:
    broker = Broker(tmp_path / "kbs", ek_roots)
    before = load_signing_keys(load_config(broker.config))
    rotated = broker.kbs("signing-key", "create", "--replace")
    assert rotated.returncode == 0, rotated
    assert "kept the old key" in rotated.stdout
    cfg = load_config(broker.config)
    after = load_signing_keys(cfg)
    assert after.current.fingerprint != before.current.fingerprint
    assert [k.fingerprint for k in after.previous] == [before.current.fingerprint]
    assert after.by_fingerprint(before.current.fingerprint) is not None
    (kept,) = cfg.previous_signing_keys
    assert kept.stat().st_mode & 0o777 == 0o600
    checked = broker.kbs("check-config")
    assert "1 previous kept" in checked.stdout, checked

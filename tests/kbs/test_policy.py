"""Component policies on real parsed logs (synthetic Secure Boot machines and the committed OVMF
boots): learning, evaluation and its denial text, widening from a canary, the intersection of two
policies, and the policy file round trip."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from harness.eventlog import BootSpec, boot_events, build_log, signing_certificate
from kbs.errors import (
    EventLogMismatch,
    EventLogMissing,
    NoPolicy,
    OperatorError,
    PcrSelectionMismatch,
    PolicyDenied,
)
from kbs.eventlog import EventLogCache, verify_event_log
from kbs.model import BootRecord, Node, NodeState, Policy
from kbs.policy import learn, policyfile
from kbs.policy.evaluate import evaluate
from kbs.policy.merge import check_compatible
from kbs.policy.rules import AllowedValue, Document, Rule, check_document
from keylease.eventlog.parse import parse_event_log
from keylease.eventlog.replay import replay

T0 = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
BANKS = ("sha1", "sha256", "sha384")
SPEC = BootSpec(
    db_certs=(signing_certificate("Debian Secure Boot CA"),),
    kek_certs=(signing_certificate("Debian KEK"),),
    pk_cert=signing_certificate("Platform Key"),
    dbx_hashes=(b"\x11" * 32, b"\x22" * 32),
)
NEW_KERNEL = SPEC.with_app(3, "\\EFI\\debian\\vmlinuz-6.1.0-28-amd64", b"linux 6.1.0-28")


def evidence(spec: BootSpec) -> tuple[dict[str, dict[int, bytes]], BootRecord]:
    """What the broker has after verifying a quote of a TPM that booted ``spec``."""
    log = build_log(boot_events(spec), BANKS)
    parsed = parse_event_log(log)
    quoted = {b: {i: bytes(len(hashlib_size(b))) for i in range(24)} for b in BANKS}
    for bank in BANKS:
        quoted[bank].update(replay(parsed, bank))
    verified = verify_event_log(EventLogCache(), log, quoted)
    return quoted, BootRecord(verified.digest, verified.states, T0)


def hashlib_size(bank: str) -> bytes:
    return bytes({"sha1": 20, "sha256": 32, "sha384": 48}[bank])


def node(name: str, quoted: dict[str, dict[int, bytes]]) -> Node:
    return Node(name, NodeState.APPROVED, {"cluster": "prod"}, "e" * 64, b"", b"", b"", {}, T0,
                T0, quoted, 1, 0)  # fmt: skip


def policy(document: Document, name: str = "prod-boot") -> Policy:
    return Policy(name, document, ({"cluster": "prod"},))


def learned(spec: BootSpec = SPEC, bank: str = "sha256") -> Policy:
    quoted, boot = evidence(spec)
    return policy(learn.learn(node("worker-1", quoted), boot, bank, None, T0))


def test_learn_names_every_component_of_the_boot() -> None:
    p = learned()
    names = [r.component for r in p.rules]
    assert names == [
        "firmware", "boot-variables", "pcr.2", "pcr.3", "boot-app.1", "boot-app.2", "boot-app.3",
        "pcr.5", "pcr.6", "secure-boot", "pk", "kek", "db", "dbx", "authorities", "sb-config",
        "kernel-cmdline", "initrd", "bootloader-config",
    ]  # fmt: skip
    assert p.document.pcrs == tuple(range(10))
    rule = p.document.rule("boot-app.3")
    assert rule is not None
    assert rule.allowed[0].note.startswith("\\EFI\\debian\\vmlinuz-6.1.0-27-amd64; learned from")
    sb_config = p.document.rule("sb-config")
    assert sb_config is not None
    assert sb_config.values == {"absent"}  # nothing else in PCR 7: one appearing is denied
    secure_boot = p.document.rule("secure-boot")
    assert secure_boot is not None
    assert secure_boot.values == {"on"}


def test_the_learned_boot_passes_and_seals_to_the_covered_pcrs() -> None:
    quoted, boot = evidence(SPEC)
    sealing = evaluate([learned()], quoted, boot.states)
    assert sealing.bank == "sha256"
    assert sorted(sealing.pcrs) == list(range(10))
    assert sealing.pcrs[4] == quoted["sha256"][4]


def test_a_new_kernel_is_denied_naming_the_boot_application_then_allowed() -> None:
    p = learned()
    quoted, boot = evidence(NEW_KERNEL)
    with pytest.raises(PolicyDenied) as denied:
        evaluate([p], quoted, boot.states)
    text = str(denied.value)
    assert text.startswith(
        "PCR 4, boot application 3 [boot-app.3] (\\EFI\\debian\\vmlinuz-6.1.0-28-amd64): digest "
    )
    assert "is not allowed by policy prod-boot (allowed: \\EFI\\debian\\vmlinuz-6.1.0-27" in text
    # GRUB read the new kernel file too: PCR 8/9 name it
    assert "bootloader-config" in text
    assert "firmware" not in text
    assert denied.value.pcrs == tuple(range(10))
    widened = policy(learn.allow(p, node("worker-2", quoted), boot, ["boot-app.3",
                                 "kernel-cmdline", "bootloader-config"], T0))  # fmt: skip
    evaluate([widened], quoted, boot.states)
    old_quoted, old_boot = evidence(SPEC)
    evaluate([widened], old_quoted, old_boot.states)  # the old kernel still passes
    changes = learn.change_lines(p, widened, selectors_given=False)
    assert any(line.startswith("+ boot-app.3: ") and "6.1.0-28" in line for line in changes)


def test_several_components_fail_together_and_an_extra_image_is_denied() -> None:
    spec = replace(SPEC, db_certs=(*SPEC.db_certs, signing_certificate("Rogue CA")),
                   apps=(*SPEC.apps, ("\\EFI\\evil.efi", b"evil")))  # fmt: skip
    quoted, boot = evidence(spec)
    with pytest.raises(PolicyDenied) as denied:
        evaluate([learned()], quoted, boot.states)
    text = str(denied.value)
    assert "PCR 7, db [db] (2 entries: x509 CN=Debian Secure Boot CA, x509 CN=Rogue CA)" in text
    assert "PCR 4, boot application 4 [boot-app.4] (\\EFI\\evil.efi)" in text
    assert "is not in policy prod-boot, which names boot-app.1, boot-app.2, boot-app.3" in text


def test_secure_boot_on_and_a_dbx_with_at_least_a_revocation_set() -> None:
    document = check_document(
        "sha256",
        [Rule("secure-boot", (AllowedValue("on"),)), Rule("dbx", contains=("11" * 32,))],
    )
    quoted, boot = evidence(SPEC)
    evaluate([policy(document)], quoted, boot.states)
    stale = replace(SPEC, dbx_hashes=(b"\x22" * 32,))
    quoted, boot = evidence(stale)
    with pytest.raises(PolicyDenied, match=r"PCR 7, dbx \[dbx\] .*lacks 1 entry that policy"):
        evaluate([policy(document)], quoted, boot.states)
    quoted, boot = evidence(replace(SPEC, secure_boot=False))
    with pytest.raises(PolicyDenied, match=r"Secure Boot \[secure-boot\] .*state off is not"):
        evaluate([policy(document)], quoted, boot.states)


def test_raw_pcr_entries_allow_several_values() -> None:
    quoted, _ = evidence(SPEC)
    value = quoted["sha256"][7].hex()
    document = check_document(
        "sha256", [Rule("pcr.7", (AllowedValue("ab" * 32, "old"), AllowedValue(value, "new")))]
    )
    evaluate([policy(document)], quoted, None)  # no log needed for raw PCRs
    quoted["sha256"][7] = b"\x01" * 32
    with pytest.raises(PolicyDenied, match=r"^PCR 7 \[pcr.7\]: value 010101…01 is not allowed"):
        evaluate([policy(document)], quoted, None)


def test_refusals_before_the_policy_is_read() -> None:
    quoted, boot = evidence(SPEC)
    with pytest.raises(NoPolicy):
        evaluate([], quoted, boot.states)
    with pytest.raises(EventLogMissing, match="sent no boot event log: set event_log in agent"):
        evaluate([learned()], quoted, None)
    with pytest.raises(PcrSelectionMismatch, match="over the sha384 bank but the node's TPM"):
        evaluate([learned(bank="sha384")], {"sha256": quoted["sha256"]}, boot.states)
    with pytest.raises(EventLogMismatch, match="carries no sha384 digests"):
        evaluate([learned(bank="sha384")], quoted, {"sha256": boot.states["sha256"]})
    with pytest.raises(PolicyDenied, match="over different PCR banks"):
        evaluate([learned(), learned(bank="sha1")], quoted, boot.states)


def test_every_policy_must_pass() -> None:
    quoted, boot = evidence(SPEC)
    strict = policy(check_document("sha256", [Rule("secure-boot", (AllowedValue("off"),))]), "x")
    with pytest.raises(PolicyDenied, match="policy x"):
        evaluate([learned(), strict], quoted, boot.states)


def test_policies_that_no_node_could_pass_together_are_refused() -> None:
    on = Policy("on", check_document("sha256", [Rule("secure-boot", (AllowedValue("on"),))]),
                ({"cluster": "prod"},))  # fmt: skip
    off = Policy("off", check_document("sha256", [Rule("secure-boot", (AllowedValue("off"),))]),
                 ({"region": "eu"},))  # fmt: skip
    with pytest.raises(OperatorError, match="allow no common value for component secure-boot"):
        check_compatible(on, [off])
    check_compatible(on, [replace(off, selectors=({"cluster": "dev"},))])  # disjoint selectors
    sha1 = Policy("sha1", check_document("sha1", [Rule("secure-boot", (AllowedValue("on"),))]),
                  ({"region": "eu"},))  # fmt: skip
    with pytest.raises(OperatorError, match="must be over one PCR bank"):
        check_compatible(on, [sha1])


def test_diff_says_per_component_what_passes() -> None:
    quoted, boot = evidence(NEW_KERNEL)
    rows = {r.component: r for r in learn.diff(learned(), node("worker-2", quoted), boot)}
    assert rows["boot-app.3"].result == "fail"
    assert rows["boot-app.1"].result == "pass"
    assert "6.1.0-27" in rows["boot-app.3"].allowed
    assert rows["boot-app.3"].node_summary == "\\EFI\\debian\\vmlinuz-6.1.0-28-amd64"


def test_learning_from_a_node_without_a_log_says_how_to_fix_it() -> None:
    quoted, _ = evidence(SPEC)
    with pytest.raises(OperatorError, match=r"set event_log in its agent\.toml"):
        learn.learn(node("w", quoted), None, "sha256", None, T0)


def test_policy_file_round_trip_and_refusals(tmp_path: Path) -> None:
    p = learned()
    text = policyfile.render(p)
    parsed = policyfile.parse(text.encode(), "prod-boot.toml")
    assert (parsed.name, parsed.document, parsed.selectors) == (p.name, p.document, p.selectors)
    tricky = replace(p, document=check_document("sha256", [
        Rule("secure-boot", (AllowedValue("on", 'quote " backslash \\ hash # apostrophe \' é ✓'),))
    ]))  # fmt: skip
    again = policyfile.parse(policyfile.render(tricky).encode(), "f")
    assert again.document == tricky.document
    for bad, error in [
        (b"name = 'x'\n", "at least one"),
        (b"name = 'x'\n[components.firmware]\nallow = [{ value = 'zz' }]\n", "not a sha256"),
        (b"name = 'x'\n[components.bogus]\nallow = [{ value = 'on' }]\n", "unknown component"),
        (b"name = 'x'\ncolour = 'red'\n[components.pcr.0]\n", "unknown key 'colour'"),
        (b"name = 'x'\n[components.'secure-boot']\nallow = []\n", "allows no value"),
        (b"name = \n", "invalid TOML"),
        (b"name = 'x'\nselectors = ['nope']\n[components.'secure-boot']\n"
         b"allow = [{ value = 'on' }]\n", "invalid"),
    ]:  # fmt: skip
        with pytest.raises(OperatorError, match=error):
            policyfile.parse(bad, "f.toml")

"""Boot event logs: parsed, replayed and read as components, checked against tpm2-tools'
tpm2_eventlog as an independent oracle on every committed log (real OVMF boots) and on synthetic
ones (Secure Boot variables, several boot applications, unknown event types, three banks)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import struct
import subprocess
from pathlib import Path

import pytest

import keylease.eventlog
from harness.eventlog import (
    EV_NO_ACTION,
    EV_SEPARATOR,
    BootSpec,
    LogEvent,
    boot_events,
    build_event_log,
    build_legacy_log,
    build_log,
    measured,
    oracle_events,
    oracle_pcrs,
    signing_certificate,
)
from kbs.errors import EventLogInvalid, EventLogMismatch
from kbs.eventlog import EventLogCache, verify_event_log
from keylease.eventlog.bootstate import derive
from keylease.eventlog.parse import MAX_EVENTS, parse_event_log
from keylease.eventlog.replay import replay

DATA = Path(__file__).resolve().parents[1] / "data" / "eventlogs"
COMMITTED = sorted(DATA.glob("*.bin"))
EVENTS = [(0, b"firmware"), (2, b"option rom"), (4, b"bootloader"), (7, b"db"), (4, b"kernel")]
ORACLE_TYPES = {"EV_NO_ACTION": 0x3, "EV_SEPARATOR": 0x4, "EV_EVENT_TAG": 0x6}


def _meta(log: Path) -> dict[str, object]:
    return dict(json.loads(log.with_suffix(".json").read_text()))


def _quoted(log: Path) -> dict[str, dict[int, bytes]]:
    """The PCR values the broker recorded from the verified quote of that boot, per bank."""
    banks = _meta(log)["pcrs"]
    assert isinstance(banks, dict)
    return {b: {int(i): bytes.fromhex(v) for i, v in values.items()} for b, values in banks.items()}


def _oracle_types(path: Path) -> list[str]:
    out = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True)
    return [ln.split(":", 1)[1].strip() for ln in out.stdout.splitlines() if "EventType:" in ln]


def test_committed_logs_exist_with_their_capture_command() -> None:
    assert len(COMMITTED) >= 2, COMMITTED
    for log in COMMITTED:
        assert str(_meta(log)["captured_by"]).startswith("python -m tests.system.vm.capture")


@pytest.mark.parametrize("log", COMMITTED, ids=lambda p: p.stem)
def test_committed_ovmf_logs_match_tpm2_eventlog_and_the_quote(log: Path) -> None:
    """Event count, types, every digest and the replayed PCRs agree with tpm2_eventlog; the
    replay matches the PCRs the broker verified in that boot's quote."""
    data = log.read_bytes()
    parsed = parse_event_log(data)
    oracle = oracle_events(log)
    assert len(parsed.events) + 1 == len(oracle)  # the oracle counts the Spec ID header
    for mine, theirs in zip(parsed.events, oracle[1:], strict=True):
        assert mine.pcr == theirs.pcr
        assert {b: d for b, d in mine.digests.items()} == theirs.digests
    from keylease.eventlog.events import event_name

    assert [event_name(e.type) for e in parsed.events] == _oracle_types(log)[1:]
    expected = oracle_pcrs(log)
    for bank in parsed.banks:
        assert replay(parsed, bank) == expected[bank]
    verified = verify_event_log(EventLogCache(), data, _quoted(log))
    assert set(verified.banks) == set(parsed.banks)


def test_ovmf_boot_states_name_the_components() -> None:
    base = verify_event_log(
        EventLogCache(), (DATA / "ovmf-base.bin").read_bytes(), _quoted(DATA / "ovmf-base.bin")
    )
    state = base.states["sha256"]
    names = [c.name for c in state.components]
    assert names[:3] == ["firmware", "boot-variables", "boot-app.1"]
    assert {"secure-boot", "pk", "kek", "db", "dbx", "kernel-cmdline"} <= set(names)
    secure_boot = state.get("secure-boot")
    assert secure_boot is not None
    assert secure_boot.value == "off"  # OVMF without enrolled keys
    app = state.get("boot-app.1")
    assert app is not None
    assert app.summary == "kernel"  # qemu -kernel: a file path node "kernel"
    firmware = state.get("firmware")
    assert firmware is not None
    assert firmware.value == _quoted(DATA / "ovmf-base.bin")["sha256"][0].hex()
    assert "2 firmware blob(s)" in firmware.summary
    # The EFI stub measures the command line (UTF-16, NUL-terminated) into PCR 9.
    cmdline = state.get("kernel-cmdline")
    assert cmdline is not None
    text = str(_meta(DATA / "ovmf-base.bin")["cmdline"]) + "\0"
    assert cmdline.value == hashlib.sha256(text.encode("utf-16-le")).hexdigest()
    assert state.touched == (0, 1, 2, 3, 4, 5, 6, 7, 9)


def test_the_two_ovmf_boots_differ_in_the_kernel_command_line_only() -> None:
    states = []
    for name in ("ovmf-base.bin", "ovmf-cmdline.bin"):
        verified = verify_event_log(
            EventLogCache(), (DATA / name).read_bytes(), _quoted(DATA / name)
        )
        states.append({c.name: c.value for c in verified.states["sha256"].components})
    base, changed = states
    assert {k for k in base if base[k] != changed[k]} == {"kernel-cmdline"}


def test_the_three_bank_ovmf_boot_shows_the_same_components_in_every_bank() -> None:
    """The same guest booted on a TPM with sha1, sha256 and sha384 active: three digests per
    event; in sha256 the boot state is that of the sha256-only boot."""
    multi = verify_event_log(
        EventLogCache(),
        (DATA / "ovmf-multibank.bin").read_bytes(),
        _quoted(DATA / "ovmf-multibank.bin"),
    )
    assert multi.banks == ("sha1", "sha256", "sha384")
    base = verify_event_log(
        EventLogCache(), (DATA / "ovmf-base.bin").read_bytes(), _quoted(DATA / "ovmf-base.bin")
    )
    assert multi.states["sha256"] == base.states["sha256"]
    names = {b: [c.name for c in s.components] for b, s in multi.states.items()}
    assert names["sha1"] == names["sha256"] == names["sha384"]
    app = multi.states["sha384"].get("boot-app.1")
    assert app is not None
    assert len(app.value) == 96


def _spec(**changes: object) -> BootSpec:
    spec = BootSpec(
        db_certs=(signing_certificate("Test db CA"),),
        kek_certs=(signing_certificate("Test KEK"),),
        pk_cert=signing_certificate("Test PK"),
        dbx_hashes=(b"\x11" * 32, b"\x22" * 32),
    )
    return BootSpec(**{**spec.__dict__, **changes})


def test_synthetic_secure_boot_log_against_tpm2_eventlog(tmp_path: Path) -> None:
    unknown = measured(4, 0x0000ABCD, b"vendor event")
    events = boot_events(_spec(extra=(unknown, measured(14, 0x800000E0, b"\x00" * 40))))
    log = build_log(events, ("sha1", "sha256", "sha384"))
    path = tmp_path / "log.bin"
    path.write_bytes(log)
    expected = oracle_pcrs(path)
    assert sorted(expected) == ["sha1", "sha256", "sha384"]
    verified = verify_event_log(EventLogCache(), log, expected)
    assert verified.banks == ("sha1", "sha256", "sha384")
    state = verified.states["sha384"]
    apps = [(c.name, c.summary) for c in state.components if c.name.startswith("boot-app.")]
    assert apps == [
        ("boot-app.1", "\\EFI\\debian\\shimx64.efi"),
        ("boot-app.2", "\\EFI\\debian\\grubx64.efi"),
        ("boot-app.3", "\\EFI\\debian\\vmlinuz-6.1.0-27-amd64"),
        ("boot-app.4", "unknown event type 0x0000abcd"),  # kept and shown, never a crash
    ]
    kernel = state.get("boot-app.3")
    assert kernel is not None
    assert kernel.value == hashlib.sha384(b"linux 6.1.0-27").hexdigest()
    secure_boot, db, dbx = state.get("secure-boot"), state.get("db"), state.get("dbx")
    assert secure_boot is not None
    assert secure_boot.value == "on"
    assert db is not None
    assert "CN=Test db CA" in db.summary
    assert dbx is not None
    assert dbx.entries == ("11" * 32, "22" * 32)
    authorities = state.get("authorities")
    assert authorities is not None
    assert "db: CN=Test db CA" in authorities.summary
    cmdline = state.get("kernel-cmdline")
    assert cmdline is not None
    assert cmdline.summary == "/boot/vmlinuz-6.1.0-27-amd64 root=/dev/vda1 ro quiet"
    assert 14 in state.touched


def test_variable_data_that_does_not_match_its_digest_is_not_trusted() -> None:
    spec = _spec()
    events = boot_events(spec)
    forged = []
    for e in events:
        if e.type == 0x80000001 and b"S\x00e\x00c\x00u\x00r\x00e\x00" in e.data:
            # data says Secure Boot on, the digest measured "off": the data is a lie
            e = LogEvent(e.pcr, e.type, e.data, measured(7, e.type, e.data[:-1] + b"\0").digests)
        forged.append(e)
    log = build_log(forged)
    state = derive(parse_event_log(log), "sha256", replay(parse_event_log(log), "sha256"))
    secure_boot = state.get("secure-boot")
    assert secure_boot is not None
    assert secure_boot.value == "unverified"


def test_replay_matches_tpm2_eventlog(tmp_path: Path) -> None:
    log = (
        build_event_log(EVENTS)
        + build_event_log([(7, b"sep")], event_type=EV_SEPARATOR)[len(build_event_log([])) :]
    )
    path = tmp_path / "log.bin"
    path.write_bytes(log)
    replayed = replay(parse_event_log(log), "sha256")
    assert replayed == oracle_pcrs(path)["sha256"]
    expected4 = hashlib.sha256(bytes(32) + hashlib.sha256(b"bootloader").digest()).digest()
    expected4 = hashlib.sha256(expected4 + hashlib.sha256(b"kernel").digest()).digest()
    assert replayed[4] == expected4


def test_no_action_events_are_not_extended_and_startup_locality_sets_pcr0() -> None:
    locality = LogEvent(0, EV_NO_ACTION, b"StartupLocality\x00\x03")
    log = build_log([locality, measured(0, 0xD, b"x", banks=("sha1", "sha256"))])
    replayed = replay(parse_event_log(log), "sha256")
    assert replayed == {
        0: hashlib.sha256(bytes(31) + b"\x03" + hashlib.sha256(b"x").digest()).digest()
    }


def test_legacy_sha1_log_is_parsed_and_replayed() -> None:
    events = [
        measured(0, 0x8, b"crtm", banks=("sha1",)),
        measured(4, 0xD, b"boot", banks=("sha1",)),
    ]
    log = build_legacy_log(events)
    parsed = parse_event_log(log)
    assert parsed.legacy
    assert parsed.banks == ("sha1",)
    boot = hashlib.sha1(b"boot", usedforsecurity=False).digest()
    assert (
        replay(parsed, "sha1")[4] == hashlib.sha1(bytes(20) + boot, usedforsecurity=False).digest()
    )


def test_a_changed_event_names_the_pcr_and_bank() -> None:
    quoted = {"sha256": {i: bytes(32) for i in range(24)}}
    quoted["sha256"].update(replay(parse_event_log(build_event_log(EVENTS)), "sha256"))
    verify_event_log(EventLogCache(), build_event_log(EVENTS), quoted)
    altered = [*EVENTS[:3], (7, b"another db"), EVENTS[4]]
    with pytest.raises(EventLogMismatch, match=r"PCR 7 \(sha256\)"):
        verify_event_log(EventLogCache(), build_event_log(altered), quoted)


def test_log_touching_an_unquoted_pcr_is_refused() -> None:
    with pytest.raises(EventLogMismatch, match=r"extends PCR 4,7 \(sha256\).*not cover"):
        verify_event_log(
            EventLogCache(), build_event_log(EVENTS), {"sha256": {0: bytes(32), 2: bytes(32)}}
        )


def test_log_without_a_quoted_bank_is_refused() -> None:
    log = build_log([measured(0, 0xD, b"x", banks=("sha384",))], ("sha384",))
    with pytest.raises(
        EventLogMismatch, match=r"carries sha384 digests but the quote covers sha256"
    ):
        verify_event_log(EventLogCache(), log, {"sha256": {0: bytes(32)}})


def _header(banks: int = 2) -> bytes:
    return build_event_log([])


@pytest.mark.parametrize(
    ("log", "error"),
    [
        (b"", "empty"),
        (b"\x00" * 7, "truncated"),
        (b"garbage that is not an event log at all" * 3, "out of range|truncated"),
        (build_event_log(EVENTS)[:-3], "truncated in event 5's data"),
        (build_event_log(EVENTS)[:100], "truncated"),
        (build_event_log([]) + struct.pack("<III", 0, 0xD, 3), "carries 3 digests"),
        (build_event_log([]) + struct.pack("<IIIH", 0, 0xD, 2, 0x12), "0x0012"),
        (build_event_log([(30, b"x")]), "PCR 30, out of range"),
    ],
    ids=["empty", "short", "garbage", "truncated-tail", "truncated-mid", "digest-count",
         "unknown-algorithm", "pcr-out-of-range"],
)  # fmt: skip
def test_malformed_logs_are_event_log_invalid(log: bytes, error: str) -> None:
    with pytest.raises(EventLogInvalid, match=error):
        verify_event_log(EventLogCache(), log, {"sha256": {i: bytes(32) for i in range(24)}})


def test_a_log_of_100000_events_is_refused() -> None:
    events = [measured(8, 0xD, b"", banks=("sha256",))] * 100_000
    log = build_log(events, ("sha256",))
    with pytest.raises(keylease.eventlog.EventLogInvalid, match=f"more than {MAX_EVENTS} events"):
        parse_event_log(log)


def test_mutated_real_logs_never_crash_the_parser() -> None:
    """Random byte flips, cuts and splices of the OVMF logs: only our two errors, or a parse."""
    rng = random.Random(9)
    base = (DATA / "ovmf-base.bin").read_bytes()
    quoted = _quoted(DATA / "ovmf-base.bin")
    for _ in range(1500):
        data = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        with contextlib.suppress(EventLogInvalid, EventLogMismatch):
            verify_event_log(EventLogCache(), bytes(data), quoted)

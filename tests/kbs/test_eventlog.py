"""Boot event log replay, checked against tpm2-tools' tpm2_eventlog as an independent oracle."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from harness.eventlog import EV_NO_ACTION, EV_SEPARATOR, build_event_log
from kbs.errors import EventLogMismatch, InvalidRequest
from kbs.eventlog import check_event_log, parse_event_log, replay

EVENTS = [(0, b"firmware"), (2, b"option rom"), (4, b"bootloader"), (7, b"db"), (4, b"kernel")]


def oracle(log: bytes, tmp_path: Path) -> dict[int, bytes]:
    path = tmp_path / "log.bin"
    path.write_bytes(log)
    out = subprocess.run(
        ["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True
    ).stdout
    sha256 = out.split("sha256:")[-1]
    return {
        int(i): bytes.fromhex(v) for i, v in re.findall(r"(\d+)\s*:\s*0x([0-9a-fA-F]+)", sha256)
    }


def test_replay_matches_tpm2_eventlog(tmp_path: Path) -> None:
    log = (
        build_event_log(EVENTS)
        + build_event_log([(7, b"sep")], event_type=EV_SEPARATOR)[len(build_event_log([])) :]
    )
    replayed = replay(parse_event_log(log), "sha256")
    assert replayed == oracle(log, tmp_path)
    assert sorted(replayed) == [0, 2, 4, 7]
    expected4 = hashlib.sha256(bytes(32) + hashlib.sha256(b"bootloader").digest()).digest()
    expected4 = hashlib.sha256(expected4 + hashlib.sha256(b"kernel").digest()).digest()
    assert replayed[4] == expected4


def test_no_action_events_are_not_extended() -> None:
    log = (
        build_event_log([(0, b"x")])
        + build_event_log([(5, b"note")], event_type=EV_NO_ACTION)[len(build_event_log([])) :]
    )
    assert sorted(replay(parse_event_log(log), "sha256")) == [0]


def test_matching_quote_passes_and_a_changed_event_names_the_pcr() -> None:
    quoted = {i: bytes(32) for i in range(24)}
    quoted.update(replay(parse_event_log(build_event_log(EVENTS)), "sha256"))
    check_event_log(build_event_log(EVENTS), "sha256", quoted)
    altered = [*EVENTS[:3], (7, b"another db"), EVENTS[4]]
    with pytest.raises(EventLogMismatch, match="PCR 7"):
        check_event_log(build_event_log(altered), "sha256", quoted)


def test_log_touching_an_unquoted_pcr_is_refused() -> None:
    with pytest.raises(EventLogMismatch, match="PCR 4"):
        check_event_log(build_event_log(EVENTS), "sha256", {0: bytes(32), 2: bytes(32)})


@pytest.mark.parametrize(
    "log",
    [
        b"",
        b"\x00" * 7,
        b"garbage that is not an event log at all" * 3,
        build_event_log(EVENTS)[:-3],
        build_event_log(EVENTS)[:100],
    ],
    ids=["empty", "short", "garbage", "truncated-tail", "truncated-mid"],
)
def test_malformed_logs_are_invalid_requests(log: bytes) -> None:
    with pytest.raises(InvalidRequest, match="event log"):
        check_event_log(log, "sha256", {i: bytes(32) for i in range(24)})

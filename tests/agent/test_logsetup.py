"""agent.logsetup: the structured fields reach journald's native protocol, for real.

A subprocess logs through ``setup_logging(journal=True)`` inside a private mount namespace
(``unshare --mount``) in which /run is a test directory holding a datagram socket at
systemd/journal/socket, the path libsystemd's sd_journal_sendv() writes to. The test receives the
datagram and parses the journal native protocol (``FIELD=value\\n`` or ``FIELD\\n<le64 size>
<bytes>\\n``). The host's /run is never touched.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_LOG_CHILD = r"""
import logging, sys
from agent.logsetup import setup_logging
setup_logging(verbose=False, journal=sys.argv[1] == "journal")
log = logging.getLogger("agent.daemon")
log.debug("not shown at INFO")
log.info("node %s: installed %s", "worker-1", "prod-eu",
         extra={"NODE": "worker-1", "KEY": "prod-eu", "RESULT": "ok", "REASON": "lease renewed"})
log.warning("multi\nline", extra={"RESULT": "denied", "REASON": None})
"""


def parse_native(datagram: bytes) -> dict[str, bytes]:
    """journald's native protocol; fields repeat rarely, the last value wins here."""
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(datagram):
        newline = datagram.index(b"\n", pos)
        line = datagram[pos:newline]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = newline + 1
        else:
            name = line
            (size,) = struct.unpack_from("<Q", datagram, newline + 1)
            start = newline + 1 + 8
            value = datagram[start : start + size]
            assert datagram[start + size : start + size + 1] == b"\n"
            pos = start + size + 1
        fields[name.decode()] = value
    return fields


@pytest.fixture
def fake_run() -> Iterator[tuple[Path, socket.socket]]:
    with tempfile.TemporaryDirectory(prefix="kl-run-") as tmp:
        run = Path(tmp)
        (run / "systemd" / "journal").mkdir(parents=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(run / "systemd" / "journal" / "socket"))
        sock.settimeout(10)
        try:
            yield run, sock
        finally:
            sock.close()


def test_structured_fields_reach_the_journal_socket(
    fake_run: tuple[Path, socket.socket],
) -> None:
    run, sock = fake_run
    script = 'mount --bind "$1" /run && exec "$2" -c "$3" journal'
    unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    proc = subprocess.run(
        [*unshare, str(run), sys.executable, _LOG_CHILD],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nothing went to stderr: it all went to the journal
    info = parse_native(sock.recv(65536))
    warning = parse_native(sock.recv(65536))

    assert info["MESSAGE"] == b"node worker-1: installed prod-eu"  # no timestamp, no level
    assert info["PRIORITY"] == b"6"
    assert info["SYSLOG_IDENTIFIER"] == b"keylease-agent"
    assert info["LOGGER"] == b"agent.daemon"
    assert info["NODE"] == b"worker-1"
    assert info["KEY"] == b"prod-eu"
    assert info["RESULT"] == b"ok"
    assert info["REASON"] == b"lease renewed"
    assert info["CODE_FUNC"] == b"<module>"
    # Only valid journal field names: not every attribute of the log record.
    assert all(name.isupper() for name in info), sorted(info)
    assert "CODE_ARGS" not in info

    assert warning["MESSAGE"] == b"multi\nline"  # sent in the binary-safe form
    assert warning["PRIORITY"] == b"4"
    assert warning["RESULT"] == b"denied"
    assert "REASON" not in warning  # None values are dropped
    assert "NODE" not in warning


def test_stderr_format_without_journal() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _LOG_CHILD, "stderr"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=True,
    )
    assert proc.stderr.splitlines() == [
        "INFO agent.daemon: node worker-1: installed prod-eu",
        "WARNING agent.daemon: multi",
        "line",
    ]


_WANTED_CHILD = (
    "import os; from agent.logsetup import journal_wanted; print(journal_wanted(os.environ))"
)


@pytest.mark.parametrize(
    ("stream", "expected"),
    [("match", "True"), ("other", "False"), ("garbage", "False"), (None, "False")],
)
def test_journal_wanted_compares_stderr_with_journal_stream(
    tmp_path: Path, stream: str | None, expected: str
) -> None:
    err = tmp_path / "stderr"
    other = tmp_path / "other"
    other.touch()
    with err.open("w") as err_file:
        st_err, st_other = os.fstat(err_file.fileno()), other.stat()
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        env["PYTHONPATH"] = str(ROOT)
        if stream == "match":
            env["JOURNAL_STREAM"] = f"{st_err.st_dev}:{st_err.st_ino}"
        elif stream == "other":
            env["JOURNAL_STREAM"] = f"{st_other.st_dev}:{st_other.st_ino}"
        elif stream == "garbage":
            env["JOURNAL_STREAM"] = "not-a-stream"
        out = subprocess.run(
            [sys.executable, "-c", _WANTED_CHILD],
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=60,
            check=True,
        ).stdout
    assert out.strip() == expected

"""The shared package's pieces of issue 10: the one escaping function, the node-call header's
single encoding, and process hardening (non-dumpable, memory locked only where it is safe)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.broker import Broker
from keylease.api.v1.nodeauth import (
    AUTH_METADATA_KEY,
    GET_NONCE,
    WATCH,
    auth_metadata,
    call_mac,
    node_key,
    parse_auth_header,
)
from keylease.secret import Secret
from keylease.text import printable

KEY = node_key(b"s" * 32, "worker-1")


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text, spaces and ünïcödé", "plain text, spaces and ünïcödé"),
        ("\x1b[2J\x1b]0;pwned\x07", r"\x1b[2J\x1b]0;pwned\x07"),
        ("line\nINFO forged: ok\r", r"line\x0aINFO forged: ok\x0d"),
        ("abc\u202edcba\u200b", r"abc\u202edcba\u200b"),  # bidi override, zero-width space
        ("\x9b31m\x7f", r"\x9b31m\x7f"),  # C1 CSI, DEL
        ("\U000e0041", r"\U000e0041"),  # a tag character
    ],
)
def test_printable_escapes_what_a_terminal_or_a_log_would_act_on(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(shown) == shown  # idempotent
    assert printable(raw).isprintable()


def test_printable_limits_length() -> None:
    assert printable("x" * 10, 4) == "xxxx..."
    assert printable("\n" * 10, 2) == r"\x0a\x0a..."
    assert printable("short", 10) == "short"


def test_the_auth_header_has_exactly_one_encoding() -> None:
    ((key, value),) = auth_metadata(KEY, GET_NONCE, "worker-1", b"request")
    assert key == AUTH_METADATA_KEY
    parsed = parse_auth_header(value)
    assert parsed == ("worker-1", call_mac(KEY, GET_NONCE, "worker-1", b"request"))
    mac = value.split(" ")[2]
    unpadded, urlsafe = mac.rstrip("="), base64.urlsafe_b64encode(base64.b64decode(mac)).decode()
    for other in (
        value.replace("v1 ", "v2 "),
        value + " ",
        value.replace(" ", "  ", 1),
        f"v1 worker-1 {unpadded}",
        f"v1  {mac}",
        f"v1 worker-1 {base64.b64encode(b'short').decode()}",
        "v1 worker-1 " + "A" * 300,
        f"v1 worker-1 {mac[:-2]}B=",  # non-canonical trailing bits
    ):
        assert parse_auth_header(other) is None, other
    if urlsafe != mac:
        assert parse_auth_header(f"v1 worker-1 {urlsafe}") is None


def test_the_mac_binds_method_node_request_and_key() -> None:
    mac = call_mac(KEY, GET_NONCE, "worker-1", b"request")
    assert call_mac(KEY, WATCH, "worker-1", b"request") != mac
    assert call_mac(KEY, GET_NONCE, "worker-2", b"request") != mac
    assert call_mac(KEY, GET_NONCE, "worker-1", b"request!") != mac
    assert call_mac(Secret(bytes(32)), GET_NONCE, "worker-1", b"request") != mac
    assert node_key(b"s" * 32, "worker-2") != KEY  # one secret, a key per node name


HARDEN = """
import ctypes, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(levelname)s %(message)s")
from keylease.hardening import harden_process
report = harden_process("probe")
libc = ctypes.CDLL(None)
print(libc.prctl(3, 0, 0, 0, 0), report.memory_locked)  # PR_GET_DUMPABLE
print([l for l in open("/proc/self/status") if l.startswith("VmLck")][0].split()[1])
"""


def _probe(*prefix: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [*prefix, sys.executable, "-c", HARDEN], capture_output=True, text=True, timeout=60,
        check=False, cwd="/", env=dict(os.environ, PYTHONPATH=str(root)),
    )  # fmt: skip


def test_a_hardened_process_is_not_dumpable_and_locks_its_memory() -> None:
    result = _probe()
    assert result.returncode == 0, result.stderr
    dumpable, locked = result.stdout.split("\n")[0].split()
    assert (dumpable, locked) == ("0", "True")
    assert int(result.stdout.split("\n")[1]) > 1000  # kB locked
    assert "core dumps off, memory locked" in result.stderr


def test_without_an_unlimited_memlock_limit_it_warns_and_does_not_lock() -> None:
    """A process without CAP_IPC_LOCK and with a finite RLIMIT_MEMLOCK must not
    mlockall(MCL_FUTURE): its allocations would start failing at the limit. It says what is not
    covered instead."""
    result = _probe("setpriv", "--bounding-set=-ipc_lock", "prlimit", "--memlock=65536")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0].split() == ["0", "False"]
    assert "memory not locked: RLIMIT_MEMLOCK is 65536 bytes" in result.stderr
    assert "LimitMEMLOCK=infinity" in result.stderr


def test_the_broker_locks_its_memory(broker: Broker) -> None:
    status = Path(f"/proc/{broker.pid}/status").read_text()
    locked = next(line for line in status.splitlines() if line.startswith("VmLck"))
    assert int(locked.split()[1]) > 10_000, locked
    assert "memory not locked" not in broker.log()

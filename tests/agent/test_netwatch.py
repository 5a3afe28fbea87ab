"""agent.netwatch against real netlink, in a throw-away network namespace.

The watcher runs in a subprocess started with ``ip netns exec``; the test changes that namespace
with ``ip -n NS ...``. The host's interfaces are only read (route_to 127.0.0.1), never changed.
The link is a veth pair: some kernels (this CI's among them) have no ``dummy`` driver.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.netwatch import NetWatch, addresses, route_to

ROOT = Path(__file__).resolve().parents[2]

# Runs inside the namespace. Prints one JSON object per line; reads commands from stdin.
_CHILD = r"""
import json, logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from agent.netwatch import NetWatch, addresses, route_to

def say(**kw):
    print(json.dumps(kw), flush=True)

calls = []
def on_change(what):
    calls.append(what)
    say(event="change", what=what, at=time.monotonic())
    if len(calls) == 1:
        raise RuntimeError("first handler call fails on purpose")

say(event="before", route=route_to("198.51.100.7"), loopback=route_to("127.0.0.1"),
    unresolvable=route_to("no-such-host.invalid"), addresses=addresses())
watch = NetWatch(on_change)
watch.start()
time.sleep(0.5)  # let the thread subscribe
say(event="ready")
for line in sys.stdin:
    if line.strip() == "query":
        say(event="after", route=route_to("198.51.100.7"), addresses=addresses())
    elif line.strip() == "stop":
        t0 = time.monotonic()
        watch.stop()
        say(event="stopped", seconds=time.monotonic() - t0)
        break
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kltest-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class _Child:
    """The watcher subprocess inside the namespace, with its stdout lines on a queue."""

    def __init__(self, ns: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event!r} from the watcher within {timeout} s")
            try:
                msg = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if msg["event"] == event:
                return msg

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def finish(self) -> str:
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True)


def test_route_to_loopback_on_the_host() -> None:
    assert route_to("127.0.0.1") is True


def test_watch_in_a_network_namespace(netns: str) -> None:
    child = _Child(netns)
    try:
        before = child.next("before", timeout=20)
        # An empty namespace: not even lo is up, nothing is routable, no addresses.
        assert before["route"] is False
        assert before["loopback"] is False
        assert before["unresolvable"] is False
        assert before["addresses"] == {}
        child.next("ready", timeout=10)

        t0 = time.monotonic()
        _ip(netns, "link", "add", "kl0", "type", "veth", "peer", "name", "kl0p")
        _ip(netns, "addr", "add", "10.77.0.1/24", "dev", "kl0")
        _ip(netns, "link", "set", "kl0p", "up")
        _ip(netns, "link", "set", "kl0", "up")
        first = child.next("change", timeout=2)
        assert time.monotonic() - t0 < 2
        assert "link kl0 up" in first["what"]
        assert "address 10.77.0.1/24 added on kl0" in first["what"]

        # The first handler call raised: the watch logged it and keeps going.
        t0 = time.monotonic()
        _ip(netns, "route", "add", "198.51.100.0/24", "via", "10.77.0.2")
        second = child.next("change", timeout=2)
        assert time.monotonic() - t0 < 2
        assert "route 198.51.100.0/24 via 10.77.0.2 dev kl0 added" in second["what"]

        child.send("query")
        after = child.next("after", timeout=10)
        assert after["route"] is True
        assert "10.77.0.1" in after["addresses"]["kl0"]
        assert "lo" not in after["addresses"]

        child.send("stop")
        stopped = child.next("stopped", timeout=5)
        assert stopped["seconds"] < 1.0
    finally:
        err = child.finish()
    assert "network change handler failed" in err
    assert "first handler call fails on purpose" in err
    assert child.proc.returncode == 0, err


def test_stop_returns_promptly() -> None:
    # Only listens to the host's netlink events; changes nothing.
    watch = NetWatch(lambda _what: None)
    watch.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    watch.stop()
    assert time.monotonic() - t0 < 1.0
    # Stop before the thread got going, and a second stop, are harmless too.
    with NetWatch(lambda _what: None):
        pass
    watch.stop()


def test_addresses_on_the_host_skip_loopback() -> None:
    found = addresses()
    assert "lo" not in found
    assert all(not a.startswith("127.") and a != "::1" for addrs in found.values() for a in addrs)

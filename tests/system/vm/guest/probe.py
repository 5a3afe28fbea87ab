"""Runs inside the VM acceptance test's guest (Debian's python3, stdlib only): reports the node's
state as ``KLVM {json}`` lines on the serial console, and follows the host's commands.

Reported: the agent unit's state and STATUS=, the key files under /etc/crio/keys/keylease with
their file system type and when they appeared (seconds since boot), when multi-user.target was
reached, the state directory's file names, the last agent journal lines, and the result of
decrypting /seed/image-enc with each key (skopeo). Commands are read from 10.0.2.101:7 (a qemu
guestfwd that prints the host's command file): ``poweroff``.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

KEY_DIR = Path("/etc/crio/keys/keylease")
STATE_DIR = Path("/var/lib/keylease")
SEED_IMAGE = Path("/seed/image-enc")
SECRET_FILE = "secret.txt"
CONSOLE = "/dev/ttyS0"
EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
CONTROL = ("10.0.2.101", 7)


def _out(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return proc.stdout.strip()


def _unit(name: str) -> dict[str, str]:
    props = "ActiveState,SubState,StatusText,ActiveEnterTimestampMonotonic"
    lines = _out(["systemctl", "show", "-p", props, name]).splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _fstype(path: Path) -> str:
    best, fs = "", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount_point = fields[4]
        fstype = fields[fields.index("-") + 1]
        if str(path).startswith(mount_point) and len(mount_point) >= len(best):
            best, fs = mount_point, fstype
    return fs


def _keys() -> dict[str, dict[str, Any]]:
    keys: dict[str, dict[str, Any]] = {}
    if not KEY_DIR.is_dir():
        return keys
    offset = time.clock_gettime(time.CLOCK_REALTIME) - time.monotonic()
    for f in sorted(KEY_DIR.iterdir()):
        st = f.stat()
        keys[f.name] = {"fs": _fstype(f), "since_boot": round(st.st_mtime - offset, 2)}
    return keys


def _net() -> list[str]:
    links = [
        f"{d.name}:{(d / 'operstate').read_text().strip()}"
        for d in Path("/sys/class/net").iterdir()
    ]
    routes = Path("/proc/net/route").read_text().splitlines()[1:]
    return links + [" ".join(r.split()[:3]) for r in routes]


def _read_layer_file(layout: Path, name: str) -> bytes:
    index = json.loads((layout / "index.json").read_text())
    blob = layout / "blobs" / "sha256"
    manifest = json.loads((blob / index["manifests"][0]["digest"][7:]).read_bytes())
    for layer in manifest["layers"]:
        data = (blob / layer["digest"][7:]).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
            for member in tar.getmembers():
                if member.name.lstrip("./") == name:
                    extracted = tar.extractfile(member)
                    if extracted is not None:
                        return extracted.read()
    raise FileNotFoundError(name)


def _decrypt(key: Path) -> str:
    work = Path("/run/keylease-vm-decrypt")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        shutil.copytree(SEED_IMAGE, work / "enc")
        proc = subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--decryption-key",
                str(key),
                "oci:" + str(work / "enc") + ":v1",
                "oci:" + str(work / "dec") + ":v1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=dict(os.environ, TMPDIR=str(work)),
        )
        if proc.returncode != 0:
            return "skopeo failed: " + proc.stderr.strip()[-300:]
        return "ok: " + _read_layer_file(work / "dec", SECRET_FILE).decode().strip()
    except OSError as exc:
        return f"error: {exc}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _command() -> str:
    try:
        with socket.create_connection(CONTROL, timeout=2) as conn:
            conn.settimeout(2)
            data = b""
            while chunk := conn.recv(256):
                data += chunk
        return data.decode().strip()
    except OSError:
        return ""


def _emit_event_log(console: Any) -> None:
    """The firmware's boot event log, once per boot, as ``KLEV <base64>`` (test data capture:
    tests/system/vm/capture.py)."""
    try:
        data = EVENT_LOG.read_bytes()
    except OSError as exc:
        console.write(f"\nKLEV error {exc.strerror}\n")
    else:
        console.write("\nKLEV " + base64.b64encode(data).decode() + "\n")
    console.flush()


def _emit(console: Any, state: dict[str, Any]) -> None:
    console.write("\nKLVM " + json.dumps(state, sort_keys=True) + "\n")
    console.flush()


def main() -> None:
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    decrypted: dict[str, str] = {}
    slow: dict[str, Any] = {}
    last, last_time, slow_time, command_time = "", 0.0, 0.0, 0.0
    with open(CONSOLE, "w") as console:
        _emit_event_log(console)
        while True:
            now = time.monotonic()
            # Key files are checked every 0.2 s; units, journal and network every 2 s (each
            # needs a subprocess, slow under TCG).
            if now - slow_time > 2:
                agent = _unit("keylease-agent.service")
                multi_user = _unit("multi-user.target").get("ActiveEnterTimestampMonotonic")
                slow = {
                    "agent": agent.get("ActiveState", ""),
                    "status": agent.get("StatusText", ""),
                    "multi_user": round(int(multi_user or 0) / 1e6, 2),
                    "journal": _out(
                        ["journalctl", "-b", "-u", "keylease-agent", "-o", "cat", "-n", "12"]
                    ).splitlines(),
                    "net": _net(),
                }
                slow_time = now
            keys = _keys()
            for name, info in keys.items():
                tag = f"{name}@{info['since_boot']}"
                if tag not in decrypted:
                    decrypted[tag] = _decrypt(KEY_DIR / name)
            state: dict[str, Any] = {
                "boot": boot,
                "keys": keys,
                "state_files": sorted(p.name for p in STATE_DIR.glob("*"))
                if STATE_DIR.is_dir()
                else [],
                "decrypted": {t.split("@")[0]: r for t, r in decrypted.items()},
                **slow,
            }
            text = json.dumps(state, sort_keys=True)
            if text != last or now - last_time > 5:
                state["uptime"] = round(now, 2)
                _emit(console, state)
                last, last_time = text, now
            if now - command_time > 1:
                command_time = now
                if _command() == "poweroff":
                    state["poweroff"] = True
                    _emit(console, state)
                    subprocess.run(["systemctl", "poweroff"], check=False)
                    return
            time.sleep(0.2)


if __name__ == "__main__":
    main()

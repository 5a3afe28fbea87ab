"""The shipped systemd/ files, checked by systemd's own tools (offline: no systemd PID 1 needed).

- ``systemd-analyze verify`` on every unit must print nothing. It insists that ExecStart binaries
  exist, so it runs on a temporary copy whose /usr/local/bin/keylease-* paths point at this
  venv's console scripts; the shipped files keep /usr/local/bin.
- ``systemd-analyze security --offline=yes``: overall exposure <= 2.0 for the agent and <= 1.5
  for the broker (measured: 1.8 and 1.1 with systemd 252).
- the tmpfiles.d and sysusers.d files are applied with ``--root`` to a temporary tree.

A missing systemd-analyze is a failure, not a skip (scripts/setup.sh installs ``systemd``).
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = sorted(p for p in UNIT_DIR.iterdir() if p.suffix in (".service", ".mount"))
AGENT = UNIT_DIR / "keylease-agent.service"
KBS = UNIT_DIR / "keylease-kbs.service"
KEY_MOUNTS = ("/etc/crio/keys/keylease", "/etc/containerd/ocicrypt/keys/keylease")
MAX_EXPOSURE = {AGENT.name: 2.0, KBS.name: 1.5}
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's systemd package (scripts/setup.sh does)")
    return path


def _settings(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_every_unit_is_shipped() -> None:
    names = {p.name for p in UNITS}
    assert names == {
        "keylease-agent.service",
        "keylease-kbs.service",
        "etc-crio-keys-keylease.mount",
        "etc-containerd-ocicrypt-keys-keylease.mount",
    }


def test_shipped_units_run_the_installed_commands() -> None:
    assert _settings(AGENT)["ExecStart"] == [
        "/usr/local/bin/keylease-agent --config /etc/keylease/agent.toml run"
    ]
    assert _settings(KBS)["ExecStart"] == [
        "/usr/local/bin/keylease-kbs --config /etc/keylease/kbs.toml serve"
    ]


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    for script in ("keylease-agent", "keylease-kbs"):
        assert (VENV_BIN / script).is_file(), f"{VENV_BIN / script}: pip install -e . first"
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/usr/local/bin/", f"{VENV_BIN}/"))
        copies.append(copy)
    proc = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, copies)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.stdout + proc.stderr == ""
    assert proc.returncode == 0


def test_verify_does_complain_about_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: verify reports unknown keys and missing binaries."""
    analyze = _tool("systemd-analyze")
    broken = tmp_path / AGENT.name
    broken.write_text(AGENT.read_text().replace("Type=notify", "Type=notify\nBogusKey=1"))
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(broken)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert "BogusKey" in output
    assert "/usr/local/bin/keylease-agent" in output


def _exposure(unit: Path) -> float:
    proc = subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(
        rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", proc.stdout
    )
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@pytest.mark.parametrize("unit", [AGENT, KBS], ids=lambda u: u.name)
def test_security_exposure(unit: Path) -> None:
    assert _exposure(unit) <= MAX_EXPOSURE[unit.name]


def test_agent_unit_essentials() -> None:
    s = _settings(AGENT)
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["on-failure"]
    assert set(s["Before"][0].split()) >= {"crio.service", "containerd.service"}
    assert s["After"] == ["dev-tpmrm0.device"]  # no network-online.target
    assert s["RequiresMountsFor"] == [" ".join(KEY_MOUNTS)]
    assert s["ReadWritePaths"] == [" ".join(KEY_MOUNTS)]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["DevicePolicy"] == ["closed"]
    assert s["DeviceAllow"] == ["/dev/tpmrm0 rw"]
    assert s["StateDirectory"] == ["keylease"]
    assert s["StateDirectoryMode"] == ["0700"]


@pytest.mark.parametrize("unit", [AGENT, KBS], ids=lambda u: u.name)
def test_no_core_dumps_and_memory_may_be_locked(unit: Path) -> None:
    """Key material must not reach a core file; mlockall needs an unlimited RLIMIT_MEMLOCK."""
    s = _settings(unit)
    assert s["LimitCORE"] == ["0"]
    assert s["LimitMEMLOCK"] == ["infinity"]


@pytest.mark.parametrize("where", KEY_MOUNTS)
def test_mount_units_are_named_after_their_tmpfs(where: str) -> None:
    escaped = subprocess.run(
        [_tool("systemd-escape"), "--path", "--suffix=mount", where],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    s = _settings(UNIT_DIR / escaped)
    assert s["Where"] == [where]
    assert s["What"] == ["tmpfs"]
    assert s["Type"] == ["tmpfs"]
    options = s["Options"][0].split(",")
    assert {"mode=0700", "nosuid", "nodev", "noexec", "size=4m"} <= set(options)


def test_tmpfiles_creates_the_mount_points(tmp_path: Path) -> None:
    subprocess.run(
        [
            _tool("systemd-tmpfiles"),
            f"--root={tmp_path}",
            "--create",
            str(UNIT_DIR / "keylease.tmpfiles.conf"),
        ],
        check=True,
        capture_output=True,
    )
    for where in KEY_MOUNTS:
        made = tmp_path / where.lstrip("/")
        assert made.is_dir()
        assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_tmpfiles_leaves_an_existing_runtime_key_dir_alone(tmp_path: Path) -> None:
    existing = tmp_path / "etc/crio/keys"
    existing.mkdir(parents=True)
    existing.chmod(0o750)
    subprocess.run(
        [
            _tool("systemd-tmpfiles"),
            f"--root={tmp_path}",
            "--create",
            str(UNIT_DIR / "keylease.tmpfiles.conf"),
        ],
        check=True,
        capture_output=True,
    )
    assert stat.S_IMODE(existing.stat().st_mode) == 0o750
    assert stat.S_IMODE((existing / "keylease").stat().st_mode) == 0o700


def test_sysusers_creates_the_broker_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [
            _tool("systemd-sysusers"),
            f"--root={tmp_path}",
            str(UNIT_DIR / "keylease-kbs.sysusers.conf"),
        ],
        check=True,
        capture_output=True,
    )
    passwd = (tmp_path / "etc/passwd").read_text()
    assert re.search(r"^keylease-kbs:x:\d+:\d+:", passwd, re.MULTILINE), passwd
    assert re.search(r"^keylease-kbs:x:", (tmp_path / "etc/group").read_text(), re.MULTILINE)

"""Every way a config file can be wrong is one line and exit code 2, never a traceback, for both
programs: they share one loader (keylease.tomlfile). Each case runs the real command in a
subprocess, so an exception that escaped would show up as a traceback on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
PROGRAMS = {
    "keylease-agent": ["check-config"],
    "keylease-kbs": ["check-config"],
}


def _non_utf8(path: Path) -> str:
    path.write_bytes(b'kbs = "127.0.0.1:8443"\n# caf\xe9\n')
    return "not UTF-8 text (byte 0xe9 on line 2)"


def _directory(path: Path) -> str:
    path.mkdir()
    return "is a directory"


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return "not a regular file"


def _missing(path: Path) -> str:
    return "does not exist"


def _invalid_toml(path: Path) -> str:
    path.write_text("listen = [\n")
    return "invalid TOML"


def _nul_byte(path: Path) -> str:
    path.write_bytes(b'listen = "\x00"\n')
    return "invalid TOML"


def _too_large(path: Path) -> str:
    path.write_bytes(b"#" * (2 << 20))
    return "larger than"


CASES: dict[str, Callable[[Path], str]] = {
    "non-utf8": _non_utf8,
    "directory": _directory,
    "fifo": _fifo,
    "missing": _missing,
    "invalid-toml": _invalid_toml,
    "nul-byte": _nul_byte,
    "too-large": _too_large,
}


def _run(
    program: str, config: Path, *, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / program), "--config", str(config), *PROGRAMS[program]]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _assert_one_line(proc: subprocess.CompletedProcess[str], config: Path, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(config) in lines[0]
    assert expected in lines[0]


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_file_is_one_line_and_exit_2(tmp_path: Path, program: str, case: str) -> None:
    config = tmp_path / "config.toml"
    expected = CASES[case](config)
    _assert_one_line(_run(program, config), config, expected)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_unreadable_config_file_is_one_line_and_exit_2(tmp_path: Path, program: str) -> None:
    """As another user (root reads anything): the file is 0600 root, the command runs as nobody."""
    tmp_path.chmod(0o755)
    config = tmp_path / "config.toml"
    config.write_text('listen = "127.0.0.1:8443"\n')
    config.chmod(0o600)
    _assert_one_line(_run(program, config, user="65534"), config, "permission denied")

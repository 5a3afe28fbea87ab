"""Offline installs of keylease: a cached wheelhouse of every dependency, and the project's wheel.

The wheelhouse (``$KEYLEASE_WHEELHOUSE``, default /var/cache/keylease-wheels) holds a wheel of
each distribution both extras need, at the versions the dev environment resolved (``pip freeze``,
whose hash names the directory). Building it needs PyPI, so `make test` builds it before the
suite (``python -m harness.wheelhouse``); tests then install from it with ``--no-index`` and
build the project's own wheel from the working tree, offline.

Used by tests/system/test_install.py (an agent-only and a broker-only venv) and by the VM image
(tests/system/vm/image.py), whose guest installs ``keylease[agent]`` from the same wheels.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "WheelhouseMissing",
    "build_wheelhouse",
    "pinned_versions",
    "project_wheel",
    "wheelhouse",
]

REPO = Path(__file__).resolve().parents[1]
EXTRAS = "agent,broker"


class WheelhouseMissing(Exception):
    """The dependency wheels were not built yet (they need PyPI once)."""


def _root() -> Path:
    return Path(os.environ.get("KEYLEASE_WHEELHOUSE", "/var/cache/keylease-wheels"))


def pinned_versions() -> bytes:
    """The distributions this environment resolved (``pip freeze``, name==version lines)."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
    ).stdout
    lines = [ln for ln in frozen.decode().splitlines() if "==" in ln and " @ " not in ln]
    return ("\n".join(sorted(lines)) + "\n").encode()


def _directory(pins: bytes) -> Path:
    return _root() / hashlib.sha256(pins).hexdigest()[:16]


def wheelhouse() -> Path:
    """The dependency wheels for the current pins; raises WheelhouseMissing (offline)."""
    directory = _directory(pinned_versions())
    if not (directory / ".complete").exists():
        raise WheelhouseMissing(
            f"no dependency wheelhouse at {directory}: run `make test` (or "
            "`.venv/bin/python -m harness.wheelhouse`) once with PyPI reachable"
        )
    return directory


def build_wheelhouse() -> Path:
    """Build (once per pin set) the wheels of every dependency of keylease[agent,broker]."""
    pins = pinned_versions()
    directory = _directory(pins)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (directory / ".complete").exists():
            return directory
        with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
            staging = Path(tmp) / "wheels"
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_bytes(pins)
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", f"{REPO}[{EXTRAS}]",
                 "-w", str(staging), "-c", str(constraints)],
                check=True,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            for own in staging.glob("keylease-*.whl"):  # built fresh from the tree when needed
                own.unlink()
            (staging / ".complete").write_text("")
            shutil.rmtree(directory, ignore_errors=True)
            staging.rename(directory)
        for old in directory.parent.iterdir():  # older pin sets
            if old.is_dir() and old != directory:
                shutil.rmtree(old, ignore_errors=True)
    return directory


SOURCES = ("agent", "kbs", "keylease", "pyproject.toml", "README.md")


def project_wheel(out: Path) -> Path:
    """Build keylease's own wheel from the working tree, offline (no build isolation), in a
    scratch copy of the sources: setuptools reuses an in-tree ``build/`` directory, which would
    carry modules that no longer exist into the wheel."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="keylease-src-") as tmp:
        src = Path(tmp)
        for name in SOURCES:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, src / name)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
             "--no-build-isolation", str(src), "-w", str(out)],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    (wheel,) = out.glob("keylease-*.whl")
    return wheel


if __name__ == "__main__":
    print(build_wheelhouse())

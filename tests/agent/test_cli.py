"""keylease-agent's entry point on an install without the ``agent`` extra, and without the broker.

Nothing is uninstalled: a child interpreter marks modules as absent (``sys.modules[name] = None``
makes ``importlib.util.find_spec`` report them missing and any import of them fail), then calls
``agent.cli.main`` as the ``keylease-agent`` script does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import EXTRA_MODULES
from keylease.extras import missing_extra

ROOT = Path(__file__).resolve().parents[2]

_WITHOUT = """
import sys
sys.modules.update(dict.fromkeys(sys.argv[1].split(","), None))
from agent.cli import main
sys.exit(main(sys.argv[2:]))
"""

_IMPORT_ALL = """
import importlib, pkgutil, sys
sys.modules["kbs"] = None
import agent
for module in pkgutil.walk_packages(agent.__path__, "agent."):
    importlib.import_module(module.name)
print(",".join(sorted(m for m in sys.modules if m.startswith("agent."))))
"""


def _python(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )


def test_missing_extra_names_the_program_the_extra_and_what_is_missing() -> None:
    message = missing_extra("keylease-agent", "agent", ("json", "keylease_no_such_module"))
    assert message == (
        "keylease-agent: this installation lacks the 'agent' extra "
        "(missing: keylease_no_such_module); install it with: pip install 'keylease[agent]'"
    )
    assert missing_extra("keylease-agent", "agent", EXTRA_MODULES) is None  # the dev venv has it


@pytest.mark.parametrize(
    ("absent", "argv"),
    [
        ("systemd,pyroute2", ["--help"]),  # a broker host: tpm2-pytss but not the rest
        ("tpm2_pytss,systemd,pyroute2", ["--help"]),  # the base install
        ("pyroute2", ["attest", "--once"]),
        ("tpm2_pytss", ["run"]),
        ("systemd", ["status", "--json"]),
        ("systemd", ["--config", "/nonexistent/agent.toml", "check-config"]),
    ],
)
def test_without_the_agent_extra_every_command_prints_one_line_and_exits_2(
    absent: str, argv: list[str]
) -> None:
    proc = _python(_WITHOUT, absent, *argv)
    missing = ", ".join(absent.split(","))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (
        f"keylease-agent: this installation lacks the 'agent' extra (missing: {missing}); "
        "install it with: pip install 'keylease[agent]'\n"
    )


def test_the_entry_point_imports_nothing_of_the_extra_or_the_broker() -> None:
    proc = _python(
        "import sys, agent.cli; "
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'tpm2_pytss', 'systemd', 'pyroute2', 'kbs'})))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "\n"


def test_every_agent_module_imports_without_the_broker() -> None:
    """Each command imports only agent modules; with ``kbs`` made unimportable, all of them
    still import (the static rule is in tests/test_architecture.py)."""
    proc = _python(_IMPORT_ALL)
    assert proc.returncode == 0, proc.stderr
    imported = proc.stdout.strip().split(",")
    assert {"agent.cli", "agent.daemon.loop", "agent.attest", "agent.tpm.facade"} <= set(imported)

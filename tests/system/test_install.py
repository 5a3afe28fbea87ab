"""Two installs from one project: a worker node gets `keylease[agent]` and nothing of the broker;
the broker host gets `keylease[broker]`. Fresh venvs, installed offline from the dependency
wheelhouse (harness.wheelhouse) and a wheel of the working tree, exactly as the VM guest is."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

from harness.wheelhouse import WheelhouseMissing, project_wheel, wheelhouse


def _run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run from "/": from the checkout, `python -c "import systemd"` would import the
    repository's systemd/ directory (unit files) as a namespace package."""
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, check=False, cwd="/"
    )


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    try:
        deps = wheelhouse()
    except WheelhouseMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    own = tmp_path_factory.mktemp("project-wheel")
    project_wheel(own)
    return deps, own


def _install(target: Path, extra: str, wheels: tuple[Path, Path]) -> Path:
    venv.create(target, with_pip=True)
    deps, own = wheels
    pip = _run(
        target / "bin" / "pip", "install", "-q", "--no-index",
        "--find-links", deps, "--find-links", own, f"keylease[{extra}]",
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    return target / "bin"


def test_agent_extra_installs_the_agent_and_nothing_of_the_broker(
    tmp_path: Path, wheels: tuple[Path, Path]
) -> None:
    bin_dir = _install(tmp_path / "agent-venv", "agent", wheels)
    helped = _run(bin_dir / "keylease-agent", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "attest" in helped.stdout
    for module in ("sqlalchemy", "alembic", "psycopg", "prometheus_client", "grpc_health"):
        probe = _run(bin_dir / "python", "-c", f"import {module}")
        assert probe.returncode != 0, f"{module} is installed with the agent extra"
        assert "ModuleNotFoundError" in probe.stderr
    broker = _run(bin_dir / "keylease-kbs", "--help")
    assert broker.returncode == 2
    assert "Traceback" not in broker.stderr
    assert "pip install 'keylease[broker]'" in broker.stderr


def test_broker_extra_installs_the_broker_and_not_the_agent(
    tmp_path: Path, wheels: tuple[Path, Path]
) -> None:
    bin_dir = _install(tmp_path / "broker-venv", "broker", wheels)
    helped = _run(bin_dir / "keylease-kbs", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout
    for module in ("systemd", "pyroute2"):
        probe = _run(bin_dir / "python", "-c", f"import {module}")
        assert probe.returncode != 0, f"{module} is installed with the broker extra"
    agent = _run(bin_dir / "keylease-agent", "--help")
    assert agent.returncode == 2
    assert "Traceback" not in agent.stderr
    assert "pip install 'keylease[agent]'" in agent.stderr

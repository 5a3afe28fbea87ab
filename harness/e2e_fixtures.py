"""pytest fixtures for tests that run the real broker and agents (registered in conftest)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.broker import Broker
from harness.nodes import Node
from harness.swtpm import SwtpmCa


@pytest.fixture
def ek_roots(swtpm_ca: SwtpmCa, tmp_path: Path) -> Path:
    path = tmp_path / "ek-roots.pem"
    path.write_bytes(swtpm_ca.bundle_pem())
    return path


@pytest.fixture
def broker(tmp_path: Path, ek_roots: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "kbs", ek_roots) as running:
        yield running


@pytest.fixture(scope="session")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> SwtpmCa:
    """A TPM manufacturer CA the broker does not trust."""
    return SwtpmCa(tmp_path_factory.mktemp("foreign-ca"))


@pytest.fixture
def shm_path(tmp_path: Path) -> Iterator[Path]:
    """A per-test directory on tmpfs (/dev/shm), for key directories."""
    path = Path(tempfile.mkdtemp(prefix=f"keylease-{tmp_path.name[:40]}-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_node(
    broker: Broker, tpm_factory: Callable[..., Any], tmp_path: Path, shm_path: Path
) -> Callable[..., Node]:
    counter = iter(range(1000))

    def make(name: str, *, distinct: bool = False, ca: SwtpmCa | None = None) -> Node:
        root = tmp_path / f"node-{next(counter)}-{name}"
        root.mkdir()
        keys_root = shm_path / root.name
        keys_root.mkdir()
        return Node(
            name=name,
            tpm=tpm_factory(distinct=distinct, ca=ca),
            root=root,
            keys_root=keys_root,
            broker=broker,
        )

    return make

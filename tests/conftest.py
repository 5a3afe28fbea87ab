"""Shared fixtures: a session-wide TPM-manufacturer CA and real swtpm TPMs per test.

A missing swtpm is a failure, not a skip (STYLE.md rule 7).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.swtpm import (
    Swtpm,
    SwtpmCa,
    SwtpmToolMissing,
    copy_state,
    provision,
    require_tools,
)

pytest_plugins = ["harness.e2e_fixtures"]

TpmFactory = Callable[..., Swtpm]


@pytest.fixture(scope="session")
def swtpm_ca(tmp_path_factory: pytest.TempPathFactory) -> SwtpmCa:
    """The TPM manufacturer CA the broker trusts, with a provisioned golden TPM state."""
    try:
        require_tools()
    except SwtpmToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    return SwtpmCa(tmp_path_factory.mktemp("swtpm-ca"))


@pytest.fixture
def tpm_factory(swtpm_ca: SwtpmCa, tmp_path: Path) -> Iterator[TpmFactory]:
    """``make(distinct=False, ca=None)`` -> a started swtpm, stopped at teardown.

    By default a copy of the golden TPM (fast; every copy shares its EK). ``distinct=True`` or
    another ``ca`` provisions a new TPM with its own EK.
    """
    started: list[Swtpm] = []
    counter = itertools.count()

    def make(*, distinct: bool = False, ca: SwtpmCa | None = None) -> Swtpm:
        state_dir = tmp_path / f"tpm-{next(counter)}"
        if distinct or (ca is not None and ca is not swtpm_ca):
            provision(state_dir, ca or swtpm_ca)
        else:
            copy_state(swtpm_ca.golden, state_dir)
        tpm = Swtpm(state_dir)
        started.append(tpm)
        tpm.start()
        return tpm

    yield make
    for tpm in started:
        tpm.stop()


def _redacted(value: object) -> object:
    """Private-key PEM bytes as a digest; lists/tuples of them likewise."""
    if isinstance(value, bytes | str):
        data = value.encode() if isinstance(value, str) else value
        if b"PRIVATE KEY-----" in data:
            return f"<private key PEM, sha256 {hashlib.sha256(data).hexdigest()[:16]}>"
        return value
    if isinstance(value, list | tuple):
        return type(value)(_redacted(v) for v in value)
    return value


def pytest_assertrepr_compare(op: str, left: object, right: object) -> list[str] | None:
    """A failed comparison involving private-key PEMs shows digests, never the key bytes (test
    keys, but the suite's output is CI's log)."""
    l_red, r_red = _redacted(left), _redacted(right)
    if l_red is left and r_red is right:
        return None
    return [f"{l_red!r} {op} {r_red!r}"]

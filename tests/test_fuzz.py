"""Fuzzing in CI (issue 10): a short coverage-guided run of every fuzz target (``scripts.fuzz``,
atheris) with a fixed seed, and every input that once crashed a parser, refused now with the
parser's own error class. The long runs (1,000,000 inputs each) are in the README."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError as AgentConfigError
from agent.errors import ReleaseInvalid
from agent.release import parse_bundle
from agent.signature import ReleaseTrust
from harness.eventlog import signature_list
from kbs.errors import ConfigError as KbsConfigError
from kbs.tpm.ekcert import load_ek_roots
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1.signing import signing_certificate
from keylease.eventlog.events import EFI_CERT_X509, signature_lists
from scripts.fuzz_targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = sorted((ROOT / "tests" / "data" / "fuzz" / "regressions").glob("*.bin"))
SHORT_RUNS = 5000


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_short_fuzz_run_finds_no_crash(target: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.fuzz", target, "--runs", str(SHORT_RUNS), "--seed", "1",
         "--corpus", str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=900, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"fuzz {target}: {SHORT_RUNS} runs in" in result.stdout
    assert "crashes: 0" in result.stdout
    assert "line coverage" in result.stdout


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=p.stem) for p in REGRESSIONS],
)
def test_an_input_that_once_crashed_a_parser_is_refused(path: Path) -> None:
    target = TARGETS[path.stem.split("--")[0]]
    with pytest.raises(target.allowed):
        target.run(path.read_bytes())


def test_a_key_bundle_time_no_date_can_hold_is_refused() -> None:
    """Found by the release_bundle target: issued_at 2**63 - 48 made datetime.fromtimestamp
    raise OSError (EOVERFLOW) out of the parser."""
    for issued, not_after in ((2**63 - 48, 0), (0, 2**62), (-(2**63), 0)):
        bundle = pb.KeyBundle(node_name="n", issued_at_unix=issued, not_after_unix=not_after)
        with pytest.raises(ReleaseInvalid, match="lease times are out of range"):
            parse_bundle(bundle.SerializeToString(), "n")


def test_a_kbs_ca_the_kernel_cannot_look_up_is_a_config_error(tmp_path: Path) -> None:
    """Found by the agent_config target: a kbs_ca path component longer than NAME_MAX made
    Path.is_file() raise OSError (ENAMETOOLONG) out of load_config."""
    config = tmp_path / "agent.toml"
    config.write_text(f'kbs = "kbs.example.net:8443"\nkbs_ca = "{"x" * 300}/ca.pem"\n')
    with pytest.raises(AgentConfigError, match="cannot be used: File name too long"):
        load_config(config)


@pytest.mark.parametrize(
    "crafted",
    ["ek_certificate--invalid-x509-version", "ek_certificate--bitstring-name-attribute",
     "ek_certificate--malformed-issuer-name"],
)  # fmt: skip
def test_a_crafted_release_signing_certificate_is_refused_not_a_crash(crafted: str) -> None:
    """Found by the approvals target: the release-signing certificate's parser let
    InvalidVersion out, so a planted sealed cache or approvals file, or a release naming such a
    certificate, stopped the agent's worker instead of being refused. The certificates that
    once crashed the broker's EK check, as signing certificates: each one is ReleaseInvalid."""
    der = (ROOT / "tests" / "data" / "fuzz" / "regressions" / f"{crafted}.bin").read_bytes()
    with pytest.raises(ReleaseInvalid, match="release-signing certificate"):
        signing_certificate(der, [], ReleaseInvalid)


def test_a_crafted_certificate_elsewhere_is_refused_or_named_not_a_crash(tmp_path: Path) -> None:
    """Found in review, twins of the signing certificate's parser with the narrower catch: a
    Secure Boot db entry in a node's event log (read by the broker, and by the agent to explain
    a boot nothing approves), and the PEM files of kbs_ca and ek_roots, let InvalidVersion out of
    the parser. The db entry is now an "undecodable certificate"; the files a ConfigError."""
    der = (ROOT / "tests" / "data" / "fuzz" / "regressions" /
           "ek_certificate--invalid-x509-version.bin").read_bytes()  # fmt: skip
    entries = signature_lists(signature_list(EFI_CERT_X509, [der]))
    assert entries is not None
    assert [(e.kind, e.subject) for e in entries] == [("x509", "undecodable certificate")]
    pem = tmp_path / "crafted.pem"
    body = base64.encodebytes(der).decode()
    pem.write_text(f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n")
    with pytest.raises(AgentConfigError, match="holds no PEM certificate"):
        ReleaseTrust.load(pem)
    with pytest.raises(KbsConfigError, match="holds no PEM certificate"):
        load_ek_roots(pem)

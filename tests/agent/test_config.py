"""Agent configuration: bad input is refused with a message that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config
from agent.errors import ConfigError


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "ca.pem").write_text("placeholder")
    path = tmp_path / "agent.toml"
    path.write_text(body)
    return path


GOOD = 'kbs = "127.0.0.1:8443"\nkbs_ca = "ca.pem"\ntcti = "swtpm:path=/run/t/tpm.sock"\n'


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.kbs_ca == tmp_path / "ca.pem"
    assert cfg.key_dirs == (Path("/etc/crio/keys"), Path("/etc/containerd/ocicrypt/keys"))
    assert cfg.state_dir == Path("/var/lib/keylease")
    assert cfg.node_name


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (GOOD + "colour = 1\n", "unknown key(s) colour"),
        (GOOD.replace('"127.0.0.1:8443"', '"no-port"'), "HOST:PORT"),
        (GOOD.replace("ca.pem", "missing.pem"), "copy agent-ca.pem"),
        (GOOD.replace("swtpm:path=/run/t/tpm.sock", "swtpm"), "localhost:2321"),
        (GOOD + 'node_name = "bad name"\n', "node_name"),
        (GOOD + "key_dirs = []\n", "key_dirs"),
        (GOOD + 'key_dirs = ["/a", "/a/b"]\n', "inside"),
        (GOOD + "rpc_timeout_seconds = 0\n", "rpc_timeout_seconds"),
        ("kbs = [\n", "invalid TOML"),
    ],
)
def test_bad_config_is_refused_with_a_fix(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, body))


def test_cli_reports_config_error_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(tmp_path / "nope.toml"), "attest", "--once"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err
    assert "nope.toml" in err


def test_check_config_accepts_good_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(write(tmp_path, GOOD)), "check-config"]) == 0
    assert "ok" in capsys.readouterr().out

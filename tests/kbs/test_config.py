"""kbs.toml parsing, the files it names (check-config), the master key, and `keylease-kbs init`:
every mistake is a ConfigError that says what to do."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kbs.cli import main
from kbs.cli.broker import check_files
from kbs.config import EnrollmentMode, load_config, parse_listen
from kbs.errors import ConfigError, StoreError
from kbs.masterkey import MasterKey, key_aad, read_master_key
from keylease.secret import Secret

KBS = str(Path(sys.executable).parent / "keylease-kbs")


def write_ca_bundle(path: Path, *, ca: bool = True) -> Path:
    """A self-signed certificate standing in for a TPM manufacturer's root."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test TPM Root")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def init_broker(tmp_path: Path, *extra: str) -> Path:
    """`keylease-kbs init` into tmp_path/kbs; returns the kbs.toml path."""
    roots = write_ca_bundle(tmp_path / "vendor-roots.pem")
    directory = tmp_path / "kbs"
    argv = ["init", str(directory), "--listen", "127.0.0.1:0", "--ek-roots", str(roots), *extra]
    assert main(argv) == 0
    return directory / "kbs.toml"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kbs.toml"
    path.write_text(text)
    return path


# --- kbs.toml ---------------------------------------------------------------------------------


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, ""))
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 8443)
    assert cfg.database == tmp_path / "kbs.db"
    assert cfg.tls_cert == tmp_path / "tls/server.pem"
    assert cfg.tls_key == tmp_path / "tls/server-key.pem"
    assert cfg.master_key == tmp_path / "master.key"
    assert cfg.ek_roots == tmp_path / "ek-roots.pem"
    assert cfg.enrollment is EnrollmentMode.MANUAL
    assert (cfg.nonce_ttl_seconds, cfg.lease_seconds, cfg.enrollment_ttl_seconds) == (60, 3600, 300)


def test_every_key_and_absolute_paths(tmp_path: Path) -> None:
    cfg = load_config(
        write_config(
            tmp_path,
            'listen = "[::]:9443"\ndatabase = "/var/lib/k/kbs.db"\nenrollment = "ek-ca"\n'
            "nonce_ttl_seconds = 5\nlease_seconds = 60\nenrollment_ttl_seconds = 30\n",
        )
    )
    assert (cfg.listen_host, cfg.listen_port) == ("::", 9443)
    assert cfg.database == Path("/var/lib/k/kbs.db")
    assert cfg.enrollment is EnrollmentMode.EK_CA
    assert (cfg.nonce_ttl_seconds, cfg.lease_seconds, cfg.enrollment_ttl_seconds) == (5, 60, 30)


def test_unknown_key_is_refused_naming_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key.*lease_secs.*allowed: .*database") as info:
        load_config(write_config(tmp_path, "lease_secs = 10\n"))
    assert "lease_seconds" in str(info.value)


@pytest.mark.parametrize(
    "listen", ["8443", "::8443", "[::]8443", "host:99999", "[nothere]:1", ":8443", "a b:1", "h:x"]
)
def test_bad_listen_is_refused(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(write_config(tmp_path, f'listen = "{listen}"\n'))


def test_listen_forms() -> None:
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)  # noqa: S104
    assert parse_listen("[::1]:8443") == ("::1", 8443)
    assert parse_listen("kbs.example.net:443") == ("kbs.example.net", 443)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('lease_seconds = "10"', "`lease_seconds` must be an integer"),
        ("lease_seconds = true", "`lease_seconds` must be an integer"),
        ("nonce_ttl_seconds = 0", "`nonce_ttl_seconds` must be an integer from 1"),
        ("enrollment_ttl_seconds = 99999", "from 1 to 3600"),
        ('enrollment = "auto"', '`enrollment` must be one of "manual", "allowlist", "ek-ca"'),
        ('database = ""', "`database` must be a non-empty string"),
        ("tls_cert = 5", "`tls_cert` must be a non-empty string"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, line + "\n"))


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write_config(tmp_path, "listen = \n"))
    with pytest.raises(ConfigError, match=r"does not exist.*keylease-kbs init"):
        load_config(tmp_path / "nothing.toml")


def test_config_only_parses(tmp_path: Path) -> None:
    """Regression: kbs.config imported the store, so SQLAlchemy and Alembic (and the logger
    change they came with) loaded with the config. Parsing kbs.toml loads none of them and
    opens none of the files it names."""
    config = write_config(tmp_path, 'master_key = "absent.key"\nek_roots = "absent.pem"\n')
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from kbs.config import load_config\n"
        f"load_config(Path({str(config)!r}))\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc
    loaded = proc.stdout.split()
    heavy = ("sqlalchemy", "alembic", "psycopg", "grpc", "tpm2_pytss", "kbs.store", "kbs.tls")
    assert [m for m in loaded if m.split(".")[0] in heavy or m.startswith(heavy)] == []


# --- the files it names -----------------------------------------------------------------------


def test_initialised_broker_checks_clean(tmp_path: Path) -> None:
    cfg = load_config(init_broker(tmp_path))
    lines = check_files(cfg)
    assert any("1 CA certificate" in line for line in lines)
    assert any("key matches" in line for line in lines)


def test_master_key_readable_by_others_prints_the_chmod(tmp_path: Path) -> None:
    cfg = load_config(init_broker(tmp_path))
    os.chmod(cfg.master_key, 0o644)
    with pytest.raises(ConfigError) as info:
        read_master_key(cfg)
    assert f"chmod 600 {cfg.master_key}" in str(info.value)
    assert "0644" in str(info.value)
    with pytest.raises(ConfigError, match="chmod 600"):
        check_files(cfg)
    os.chmod(cfg.master_key, 0o400)
    assert len(read_master_key(cfg)) == 32


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_master_key_of_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    cfg = load_config(init_broker(tmp_path))
    cfg.master_key.write_bytes(b"k" * size)
    with pytest.raises(ConfigError, match="exactly 32 raw random bytes"):
        read_master_key(cfg)


def test_missing_master_key(tmp_path: Path) -> None:
    cfg = load_config(init_broker(tmp_path))
    cfg.master_key.unlink()
    with pytest.raises(ConfigError, match=r"master_key .* does not exist"):
        check_files(cfg)


def test_missing_or_bad_ek_roots(tmp_path: Path) -> None:
    cfg = load_config(init_broker(tmp_path))
    cfg.ek_roots.unlink()
    with pytest.raises(ConfigError, match=r"ek_roots .* does not exist.*TPM manufacturers"):
        check_files(cfg)
    cfg.ek_roots.write_bytes(b"not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        check_files(cfg)
    write_ca_bundle(cfg.ek_roots, ca=False)
    with pytest.raises(ConfigError, match="no CA certificate"):
        check_files(cfg)


def _issue(
    subject: str, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None, *, ca: bool
) -> tuple[bytes, tuple[str, ec.EllipticCurvePrivateKey]]:
    """A certificate for ``subject`` issued by ``issuer`` (self-signed if None): (PEM, its
    name and key, to issue further ones)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer or (subject, key)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), (subject, key)


def _kbs(config: Path, command: str) -> tuple[int, str]:
    proc = subprocess.run(
        [KBS, "--config", str(config), command],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    ("bundle", "message"),
    [("root and a leaf", "not a CA"), ("intermediate alone", "no self-signed root")],
)
def test_check_config_and_serve_agree_on_ek_roots(
    tmp_path: Path, bundle: str, message: str
) -> None:
    """Regression: check-config had an EK-roots loader of its own that passed bundles `serve`
    refused (a root plus a leaf: "1 non-CA certificate(s) ignored"; an intermediate without its
    root: OK). Now both use the one loader and say the same thing."""
    config = init_broker(tmp_path)
    root_pem, root = _issue("Test TPM Root", None, ca=True)
    inter_pem, _ = _issue("Test TPM Intermediate", root, ca=True)
    leaf_pem, _ = _issue("Not a CA", root, ca=False)
    ek_roots = config.parent / "ek-roots.pem"
    ek_roots.write_bytes(root_pem + leaf_pem if bundle == "root and a leaf" else inter_pem)
    check = _kbs(config, "check-config")
    serve = _kbs(config, "serve")
    assert check == serve
    code, err = serve
    assert code == 2, err
    assert err.startswith(f"keylease-kbs: ek_roots {ek_roots} holds ")
    assert message in err
    assert err.count("\n") == 1, err
    ek_roots.write_bytes(root_pem + inter_pem)  # roots and intermediates only: accepted
    assert _kbs(config, "check-config") == (0, "")


def test_tls_key_problems(tmp_path: Path) -> None:
    cfg = load_config(init_broker(tmp_path))
    original = cfg.tls_key.read_bytes()
    os.chmod(cfg.tls_key, 0o644)
    with pytest.raises(ConfigError, match=f"chmod 600 {cfg.tls_key}"):
        check_files(cfg)
    os.chmod(cfg.tls_key, 0o600)
    cfg.tls_key.write_bytes((cfg.tls_key.parent / "ca-key.pem").read_bytes())
    with pytest.raises(ConfigError, match="does not belong to the first certificate"):
        check_files(cfg)
    cfg.tls_key.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a usable PEM private key"):
        check_files(cfg)
    cfg.tls_key.write_bytes(original)
    cfg.tls_cert.unlink()
    with pytest.raises(ConfigError, match=r"tls_cert .* does not exist"):
        check_files(cfg)


def test_check_config_command_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = init_broker(tmp_path)
    capsys.readouterr()
    assert main(["--config", str(config), "check-config"]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    os.chmod(config.parent / "master.key", 0o640)
    assert main(["--config", str(config), "check-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keylease-kbs: ")
    assert err.count("\n") == 1
    assert "chmod 600" in err
    assert main(["--config", str(tmp_path / "absent.toml"), "check-config"]) == 2


def test_check_config_checks_the_admin_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = init_broker(tmp_path)
    capsys.readouterr()
    assert main(["--config", str(config), "check-config"]) == 0
    out = capsys.readouterr().out
    assert "admin_ca " in out
    assert "0 usable, 0 revoked or expired" in out
    (config.parent / "admin-certs.json").write_text("{not json")
    assert main(["--config", str(config), "check-config"]) == 2
    err = capsys.readouterr().err
    assert "admin_certs" in err
    assert "damaged" in err


def test_check_config_as_a_process(tmp_path: Path) -> None:
    config = write_config(tmp_path, "bogus = 1\n")
    proc = subprocess.run(
        [KBS, "--config", str(config), "check-config"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith("keylease-kbs: ")
    assert "unknown key(s) bogus" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- init -------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = init_broker(tmp_path, "--enrollment", "allowlist")
    out = capsys.readouterr().out
    directory = config.parent
    assert _mode(directory / "master.key") == 0o600
    assert len((directory / "master.key").read_bytes()) == 32
    assert _mode(directory / "tls/server-key.pem") == 0o600
    assert _mode(directory / "tls/ca-key.pem") == 0o600
    assert (directory / "agent-ca.pem").read_bytes() == (directory / "tls/ca.pem").read_bytes()
    assert (directory / "ek-roots.pem").read_bytes() == (tmp_path / "vendor-roots.pem").read_bytes()
    assert f'kbs_ca = "{directory / "agent-ca.pem"}"' in out
    assert 'kbs = "127.0.0.1:PORT"' in out

    text = config.read_text()
    for key in ("listen", "database", "tls_cert", "tls_key", "master_key", "ek_roots"):
        assert any(line.startswith(f"{key} = ") for line in text.splitlines()), key
    for key in ("enrollment", "nonce_ttl_seconds", "lease_seconds", "enrollment_ttl_seconds"):
        assert any(line.startswith(f"{key} = ") for line in text.splitlines()), key
    cfg = load_config(config)
    assert cfg.enrollment is EnrollmentMode.ALLOWLIST
    assert cfg.listen_port == 0
    check_files(cfg)

    # The server certificate is issued by the agents' CA and names the loopback address.
    ca = x509.load_pem_x509_certificate((directory / "agent-ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificates(cfg.tls_cert.read_bytes())[0]
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}

    # The test harness rewrites single lines; the result still parses.
    lines = [ln for ln in text.splitlines() if not ln.startswith("lease_seconds")]
    config.write_text("\n".join([*lines, "lease_seconds = 7", ""]))
    assert load_config(config).lease_seconds == 7


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = init_broker(tmp_path)
    directory = config.parent
    master = (directory / "master.key").read_bytes()
    toml = config.read_text()
    capsys.readouterr()
    assert main(["init", str(directory)]) == 2
    assert "refuses to overwrite" in capsys.readouterr().err
    assert (directory / "master.key").read_bytes() == master
    assert config.read_text() == toml


def test_init_with_bad_input_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "roots.pem"
    garbage.write_text("nope")
    assert main(["init", str(tmp_path / "a"), "--ek-roots", str(garbage)]) == 2
    assert "--ek-roots" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "b"), "--listen", "0.0.0.0"]) == 2  # noqa: S104
    assert "HOST:PORT" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


def test_init_without_ek_roots_and_ipv6(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "k"), "--listen", "[::1]:8443"]) == 0
    out = capsys.readouterr().out
    assert 'kbs = "[::1]:8443"' in out
    assert "ek-roots.pem before `serve`" in out
    cfg = load_config(tmp_path / "k/kbs.toml")
    assert (cfg.listen_host, cfg.listen_port) == ("::1", 8443)
    with pytest.raises(ConfigError, match="ek_roots"):
        check_files(cfg)


# --- master key -------------------------------------------------------------------------------


def test_master_key_seals_and_refuses_the_wrong_key_or_row() -> None:
    master = MasterKey(b"\x01" * 32)
    blob = master.seal(Secret(b"private"), key_aad("k", 1))
    assert master.open(blob, key_aad("k", 1)).reveal() == b"private"
    assert master.seal(Secret(b"private"), key_aad("k", 1)) != blob  # fresh nonce each time
    message = "does not decrypt with master.key: wrong master key or tampered database"
    with pytest.raises(StoreError, match=message):
        MasterKey(b"\x02" * 32).open(blob, key_aad("k", 1))
    with pytest.raises(StoreError, match=message):
        master.open(blob, key_aad("k", 2))
    tampered = bytearray(blob)
    tampered[20] ^= 1
    with pytest.raises(StoreError, match=message):
        master.open(bytes(tampered), key_aad("k", 1))
    with pytest.raises(StoreError, match="malformed"):
        master.open(b"\x02" + blob[1:], key_aad("k", 1))
    assert "01" not in repr(master)
    assert "redacted" in repr(master)
    with pytest.raises(ConfigError, match="32 bytes"):
        MasterKey(b"short")

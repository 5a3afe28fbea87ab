"""The broker's configuration: ``kbs.toml``, validated once at start-up, passed down as a frozen
value. Nothing below the CLI reads a config file or the environment.

Keys (all optional; README "kbs.toml" is the reference)::

    listen = "127.0.0.1:8443"          # HOST:PORT; "[::]:8443" for IPv6; port 0 picks one
    database = "kbs.db"                # SQLite file (WAL) or sqlite:///FILE, or a PostgreSQL URL
                                       # "postgresql://user@host/db" (or ?host=/socket/dir)
    tls_cert = "tls/server.pem"        # server certificate chain (PEM)
    tls_key = "tls/server-key.pem"     # its private key (PEM, mode 0600)
    master_key = "master.key"          # 32 random bytes, mode 0600 or 0400
    ek_roots = "ek-roots.pem"          # TPM-manufacturer roots and intermediates (PEM bundle)
    enrollment = "manual"              # manual | allowlist | ek-ca
    nonce_ttl_seconds = 60
    lease_seconds = 3600
    enrollment_ttl_seconds = 300
    admin_listen = "127.0.0.1:8444"    # the admin API (mutual TLS); "" turns it off
    admin_ca = "tls/ca.pem"            # CA that issues admin client certificates
    admin_ca_key = "tls/ca-key.pem"    # its key (read only by `admin-cert issue`)
    admin_certs = "admin-certs.json"   # issued admin certificates and their revocations
    previous_master_keys = []          # older master keys, still read during a rotation
    metrics_listen = "127.0.0.1:9464"  # Prometheus /metrics over HTTP; "" turns it off
    # deadlines, rate limits and concurrency: see kbs.limit_settings

Relative paths resolve against the config file's directory. ``check_files`` (``check-config``)
opens every file and says exactly what is wrong.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography import x509

from kbs.errors import ConfigError
from kbs.limit_settings import DEFAULT_LIMITS, LIMIT_DEFAULTS, LimitSettings, parse_limit_settings
from kbs.masterkey import MASTER_KEY_BYTES, MasterKey
from kbs.pki import load_credentials
from kbs.store_db import redact_url
from keylease.secret import Secret
from keylease.tomlfile import read_toml

__all__ = [
    "DEFAULT_CONFIG",
    "EnrollmentMode",
    "KbsConfig",
    "check_ek_roots",
    "check_files",
    "load_config",
    "master_keyring",
    "parse_config",
    "parse_listen",
    "read_master_key",
]

DEFAULT_CONFIG = Path("/etc/keylease/kbs.toml")

_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_DEFAULTS: dict[str, str | int] = {
    "listen": "127.0.0.1:8443",
    "database": "kbs.db",
    "tls_cert": "tls/server.pem",
    "tls_key": "tls/server-key.pem",
    "master_key": "master.key",
    "ek_roots": "ek-roots.pem",
    "enrollment": "manual",
    "nonce_ttl_seconds": 60,
    "lease_seconds": 3600,
    "enrollment_ttl_seconds": 300,
    "admin_listen": "127.0.0.1:8444",
    "admin_ca": "tls/ca.pem",
    "admin_ca_key": "tls/ca-key.pem",
    "admin_certs": "admin-certs.json",
}
_LISTS = ("previous_master_keys",)
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
_OPS_KEYS = ("metrics_listen", *LIMIT_DEFAULTS)  # parsed apart from _DEFAULTS
# (minimum, maximum) for each integer key
_RANGES = {
    "nonce_ttl_seconds": (1, 3600),
    "lease_seconds": (1, 90 * 86400),
    "enrollment_ttl_seconds": (1, 3600),
}


class EnrollmentMode(Enum):
    MANUAL = "manual"
    ALLOWLIST = "allowlist"
    EK_CA = "ek-ca"


@dataclass(frozen=True)
class KbsConfig:
    path: Path
    listen_host: str
    listen_port: int
    database: Path | str  # a SQLite file, or a postgresql:// URL
    tls_cert: Path
    tls_key: Path
    master_key: Path
    ek_roots: Path
    enrollment: EnrollmentMode
    nonce_ttl_seconds: int
    lease_seconds: int
    enrollment_ttl_seconds: int
    admin_listen: tuple[str, int] | None = None  # None: the admin API is off
    admin_ca: Path = Path("tls/ca.pem")
    admin_ca_key: Path = Path("tls/ca-key.pem")
    admin_certs: Path = Path("admin-certs.json")
    previous_master_keys: tuple[Path, ...] = ()
    metrics_listen: tuple[str, int] | None = None  # None: no metrics endpoint
    limits: LimitSettings = DEFAULT_LIMITS


def parse_listen(value: str, where: str = "listen") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host without brackets, port); port 0 picks one."""
    hint = f'{where} must be HOST:PORT, e.g. "0.0.0.0:8443" or "[::]:8443", got {value!r}'
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(hint)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{hint}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{hint}: write an IPv6 address in brackets, e.g. [::]:8443")
    elif not _HOST.fullmatch(host):
        raise ConfigError(hint)
    return host, int(port)


def load_config(path: Path) -> KbsConfig:
    """Read and validate ``path``; raises ConfigError naming the file, key and fix."""
    raw = read_toml(
        path,
        ConfigError,
        missing_hint="create one with `keylease-kbs init DIR` or pass --config",
    )
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> KbsConfig:
    unknown = sorted(set(raw) - set(_DEFAULTS) - set(_LISTS) - set(_OPS_KEYS))
    if unknown:
        allowed = ", ".join(sorted([*_DEFAULTS, *_LISTS, *_OPS_KEYS]))
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {allowed}")
    base = path.parent

    def text(key: str) -> str:
        value = raw.get(key, _DEFAULTS[key])
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: `{key}` must be a non-empty string")
        return value

    def file_path(key: str) -> Path:
        p = Path(text(key))
        return p if p.is_absolute() else base / p

    def integer(key: str) -> int:
        value = raw.get(key, _DEFAULTS[key])
        low, high = _RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                f"{path}: `{key}` must be an integer from {low} to {high}, got {value!r}"
            )
        return value

    host, port = parse_listen(text("listen"), f"{path}: `listen`")
    admin_text = raw.get("admin_listen", _DEFAULTS["admin_listen"])
    if not isinstance(admin_text, str):
        raise ConfigError(f'{path}: `admin_listen` must be a string such as "127.0.0.1:8444"')
    admin = parse_listen(admin_text, f"{path}: `admin_listen`") if admin_text else None
    metrics_text = raw.get("metrics_listen", DEFAULT_METRICS_LISTEN)
    if not isinstance(metrics_text, str):
        raise ConfigError(f'{path}: `metrics_listen` must be a string such as "127.0.0.1:9464"')
    metrics = parse_listen(metrics_text, f"{path}: `metrics_listen`") if metrics_text else None
    previous = raw.get("previous_master_keys", [])
    if not isinstance(previous, list) or not all(isinstance(p, str) and p for p in previous):
        raise ConfigError(
            f'{path}: `previous_master_keys` must be a list of file names, e.g. ["master.key"]'
        )
    enrollment = text("enrollment")
    try:
        mode = EnrollmentMode(enrollment)
    except ValueError:
        choices = ", ".join(f'"{m.value}"' for m in EnrollmentMode)
        raise ConfigError(
            f"{path}: `enrollment` must be one of {choices}, got {enrollment!r}"
        ) from None
    return KbsConfig(
        path=path,
        listen_host=host,
        listen_port=port,
        database=_database(text("database"), base),
        tls_cert=file_path("tls_cert"),
        tls_key=file_path("tls_key"),
        master_key=file_path("master_key"),
        ek_roots=file_path("ek_roots"),
        enrollment=mode,
        nonce_ttl_seconds=integer("nonce_ttl_seconds"),
        lease_seconds=integer("lease_seconds"),
        enrollment_ttl_seconds=integer("enrollment_ttl_seconds"),
        admin_listen=admin,
        admin_ca=file_path("admin_ca"),
        admin_ca_key=file_path("admin_ca_key"),
        admin_certs=file_path("admin_certs"),
        previous_master_keys=tuple(p if p.is_absolute() else base / p for p in map(Path, previous)),
        metrics_listen=metrics,
        limits=parse_limit_settings(raw, path),
    )


def master_keyring(cfg: KbsConfig) -> MasterKey:
    """``master_key`` plus ``previous_master_keys``; when it meets a blob sealed under a key it
    does not hold (a rotation by another process), it re-reads the config file's keys."""

    def keys(config: KbsConfig) -> tuple[bytes, list[bytes]]:
        previous = [read_master_key(config, p).reveal() for p in config.previous_master_keys]
        return read_master_key(config).reveal(), previous

    current, previous = keys(cfg)
    return MasterKey(current, previous, reload=lambda: keys(load_config(cfg.path)))


def read_master_key(cfg: KbsConfig, path: Path | None = None) -> Secret:
    """The 32-byte master key (or the one at ``path``); refuses a file that other users can read
    (with the chmod fix)."""
    path = cfg.master_key if path is None else path
    try:
        with path.open("rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            data = f.read(MASTER_KEY_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"master_key {path} does not exist; `keylease-kbs init` creates it. Without the "
            "original file the stored image keys cannot be decrypted"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read master_key {path}: {exc.strerror}") from None
    if mode not in (0o600, 0o400):
        raise ConfigError(
            f"master_key {path} has mode {mode:04o}; it must be 0600 or 0400 (readable only by "
            f"the broker's user): run `chmod 600 {path}`"
        )
    if len(data) != MASTER_KEY_BYTES:
        size = f"{len(data)} bytes" if len(data) <= MASTER_KEY_BYTES else "longer"
        raise ConfigError(
            f"master_key {path} is {size}; it must be exactly {MASTER_KEY_BYTES} raw random "
            "bytes (the file `keylease-kbs init` wrote; a new key cannot decrypt stored keys)"
        )
    return Secret(data)


def check_ek_roots(path: Path, key: str = "ek_roots") -> str:
    """Parse a PEM bundle of EK CA certificates; returns a one-line summary or raises."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{key} {path} does not exist; put the TPM manufacturers' root and intermediate "
            "certificates there (PEM) or set `ek_roots` in kbs.toml"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {key} {path}: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"{key} {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE----- "
            "blocks; convert DER with `openssl x509 -inform der`)"
        ) from None
    cas = [c for c in certs if _is_ca(c)]
    if not cas:
        raise ConfigError(
            f"{key} {path} holds {len(certs)} certificate(s) but no CA certificate "
            "(basicConstraints CA:TRUE); it must hold TPM-manufacturer roots and intermediates"
        )
    notes = []
    if len(cas) < len(certs):
        notes.append(f"{len(certs) - len(cas)} non-CA certificate(s) ignored")
    now = dt.datetime.now(dt.UTC)
    expired = [c for c in cas if c.not_valid_after_utc < now]
    if expired:
        notes.append(f"{len(expired)} expired")
    extra = f" ({'; '.join(notes)})" if notes else ""
    return f"{key} {path}: {len(cas)} CA certificate(s){extra}"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
    except ValueError:  # a malformed extension
        return False


def _database(value: str, base: Path) -> Path | str:
    """``postgresql://...`` stays a URL; ``sqlite:///FILE`` or a plain path becomes a Path."""
    if value.startswith(("postgresql://", "postgresql+psycopg://")):
        return value
    if "://" in value and not value.startswith("sqlite:///"):
        raise ConfigError(
            f"`database` must be a SQLite file, sqlite:///FILE or a postgresql:// URL, got "
            f"{value.split('://')[0]}://..."
        )
    path = Path(value.removeprefix("sqlite:///"))
    return path if path.is_absolute() else base / path


def _check_database(path: Path | str) -> str:
    if isinstance(path, str):
        return f"database {redact_url(path)}: PostgreSQL, connected and migrated at start"
    directory = path.parent
    if not directory.is_dir():
        raise ConfigError(f"database directory {directory} does not exist; create it")
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"database {path} is not a regular file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"database {path} is not readable and writable by this user")
        return f"database {path}: exists"
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            f"database {path} does not exist and its directory is not writable by this user"
        )
    return f"database {path}: will be created at start"


def check_files(cfg: KbsConfig) -> list[str]:
    """Open every file the config names; one summary line per file, or raise ConfigError."""
    creds = load_credentials(cfg.tls_cert, cfg.tls_key)
    read_master_key(cfg)
    for old in cfg.previous_master_keys:
        read_master_key(cfg, old)
    olds = f"; {len(cfg.previous_master_keys)} previous" if cfg.previous_master_keys else ""
    return [
        f"config {cfg.path}: ok (listen {cfg.listen_host}:{cfg.listen_port}, "
        f"enrollment {cfg.enrollment.value})",
        f"tls_cert {cfg.tls_cert}: valid until {creds.not_after:%Y-%m-%d} for "
        f"{', '.join(creds.names) or 'no subject alternative name'}; key matches",
        f"master_key {cfg.master_key}: {MASTER_KEY_BYTES} bytes, private{olds}",
        check_ek_roots(cfg.ek_roots),
        _check_database(cfg.database),
    ]

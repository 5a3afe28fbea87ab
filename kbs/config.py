"""The broker's configuration: ``kbs.toml`` parsed once at start-up into a frozen ``KbsConfig``,
passed down. Nothing below the CLI reads a config file or the environment, and nothing here
opens the files the config names: the loaders that do (``kbs.tls``, ``kbs.masterkey``,
``kbs.tpm.ekcert``, ``kbs.store``, ``kbs.admin.certs``) serve ``serve`` and ``check-config``
alike.

Keys (all optional; README "kbs.toml" is the reference)::

    listen = "127.0.0.1:8443"          # HOST:PORT; "[::]:8443" for IPv6; port 0 picks one
    database = "kbs.db"                # SQLite file (WAL) or sqlite:///FILE, or a PostgreSQL URL
                                       # "postgresql://user@host/db" (or ?host=/socket/dir)
    tls_cert = "tls/server.pem"        # server certificate chain (PEM)
    tls_key = "tls/server-key.pem"     # its private key (PEM, mode 0600)
    master_key = "master.key"          # 32 random bytes, mode 0600 or 0400
    signing_key = "tls/signing-key.pem"  # release-signing key (ECDSA P-256, PEM, mode 0600)
    signing_cert = "tls/signing.pem"   # its certificate, issued by the broker's CA (admin_ca)
    previous_signing_keys = []         # older signing keys (certificate + key in one PEM file,
                                       # mode 0600), kept to sign approvals for caches bound to them
    previous_master_keys = []          # older master keys, still read during a rotation
    ek_roots = "ek-roots.pem"          # TPM-manufacturer roots and intermediates (PEM bundle)
    enrollment = "manual"              # manual | allowlist | ek-ca
    nonce_ttl_seconds = 60
    lease_seconds = 3600
    approval_ttl_seconds = 3600        # how long an approval opens a cache, in the node's TPM time
                                       # (default and maximum: lease_seconds)
    enrollment_ttl_seconds = 300
    admin_listen = "127.0.0.1:8444"    # the admin API (mutual TLS); "" turns it off
    admin_ca = "tls/ca.pem"            # CA that issues admin client certificates
    admin_ca_key = "tls/ca-key.pem"    # its key (read only by `admin-cert issue`)
    admin_certs = "admin-certs.json"   # issued admin certificates and their revocations
    metrics_listen = "127.0.0.1:9464"  # Prometheus /metrics over HTTP; "" turns it off

    # the node-facing service's limits (``LimitSettings``)
    rpc_deadline_seconds = 20           # receive + handle one request, then DEADLINE_EXCEEDED
    rate_limit_peer_per_second = 500.0  # token bucket per client IP address; 0 turns it off
    rate_limit_peer_burst = 1000
    rate_limit_node_per_second = 5.0    # token bucket per node name in the request; 0: off
    rate_limit_node_burst = 50
    rate_limit_ek_per_second = 1.0      # enrollment: token bucket per EK; 0 turns it off
    rate_limit_ek_burst = 5
    max_inflight_per_peer = 128         # unfinished requests from one client IP address
    max_concurrent_attestations = 16    # enrollment + attestation work at once
    max_queued_attestations = 128       # waiting for a slot; more are refused
    max_watch_streams_per_peer = 1024   # node Watch streams open from one client IP address
    max_health_watches_per_peer = 4     # grpc.health.v1 Watch streams open from one address

    # connections (``kbs.nodeapi.front``)
    max_connections = 0                 # TCP connections at once; 0: sized from the fd limit
    max_connections_per_address = 1024  # from one client IP address; 0: no front (not advised)
    handshake_timeout_seconds = 10      # first byte and TLS handshake, then the connection goes
    idle_timeout_seconds = 300          # a connection without an RPC for this long is closed

    audit_retention_days = 90           # audit rows older than this are deleted; 0 keeps all

Relative paths resolve against the config file's directory. The limit defaults leave ample room
for a 10,000-node fleet renewing every 60 s (~170 attestations/s, two requests each) behind one
address, and for tests attesting many times in a row.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from kbs.errors import ConfigError
from keylease.api.v1.limits import MAX_LEASE_SECONDS
from keylease.tomlfile import Table, read_toml

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_LIMITS",
    "EnrollmentMode",
    "KbsConfig",
    "LimitSettings",
    "load_config",
    "parse_config",
    "parse_listen",
]

DEFAULT_CONFIG = Path("/etc/keylease/kbs.toml")

_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_KEYS = (
    "listen", "database", "tls_cert", "tls_key", "master_key", "previous_master_keys",
    "ek_roots", "enrollment", "nonce_ttl_seconds", "lease_seconds", "enrollment_ttl_seconds",
    "signing_key", "signing_cert", "rate_limit_ek_per_second", "rate_limit_ek_burst",
    "admin_listen", "admin_ca", "admin_ca_key", "admin_certs", "metrics_listen",
    "rpc_deadline_seconds", "rate_limit_peer_per_second", "rate_limit_peer_burst",
    "rate_limit_node_per_second", "rate_limit_node_burst", "max_inflight_per_peer",
    "max_concurrent_attestations", "max_queued_attestations",
    "max_watch_streams_per_peer", "max_health_watches_per_peer", "max_connections",
    "max_connections_per_address", "handshake_timeout_seconds", "idle_timeout_seconds",
    "audit_retention_days", "approval_ttl_seconds", "previous_signing_keys",
)  # fmt: skip


class EnrollmentMode(Enum):
    MANUAL = "manual"
    ALLOWLIST = "allowlist"
    EK_CA = "ek-ca"


@dataclass(frozen=True)
class LimitSettings:
    """Deadlines, rate limits and concurrency of the node-facing service (``kbs.nodeapi``)."""

    rpc_deadline_seconds: float = 20.0
    rate_limit_peer_per_second: float = 500.0
    rate_limit_peer_burst: int = 1000
    rate_limit_node_per_second: float = 5.0
    rate_limit_node_burst: int = 50
    rate_limit_ek_per_second: float = 1.0
    rate_limit_ek_burst: int = 5
    max_inflight_per_peer: int = 128
    max_concurrent_attestations: int = 16
    max_queued_attestations: int = 128
    max_watch_streams_per_peer: int = 1024
    max_health_watches_per_peer: int = 4
    max_connections: int = 0  # 0: sized from the process's file-descriptor limit at start
    max_connections_per_address: int = 1024  # 0: no connection front (kbs.nodeapi.front)
    handshake_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 300.0


DEFAULT_LIMITS = LimitSettings()


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
    signing_key: Path = Path("tls/signing-key.pem")
    signing_cert: Path = Path("tls/signing.pem")
    limits: LimitSettings = DEFAULT_LIMITS
    audit_retention_days: int = 90  # 0: keep audit rows forever
    approval_ttl_seconds: int = 3600  # at most lease_seconds
    previous_signing_keys: tuple[Path, ...] = ()


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
    t = Table(raw, path, ConfigError, _KEYS)
    host, port = _listen(t, "listen", "127.0.0.1:8443")
    enrollment = t.text("enrollment", "manual")
    try:
        mode = EnrollmentMode(enrollment)
    except ValueError:
        choices = ", ".join(f'"{m.value}"' for m in EnrollmentMode)
        raise t.fail("enrollment", f"must be one of {choices}, got {enrollment!r}") from None
    previous = t.strings("previous_master_keys", (), hint='["master.key"]')
    signing = t.strings("previous_signing_keys", (), hint='["tls/signing-previous-1.pem"]')
    lease = t.integer("lease_seconds", 3600, 1, MAX_LEASE_SECONDS)
    return KbsConfig(
        path=path,
        listen_host=host,
        listen_port=port,
        database=_database(t),
        tls_cert=t.path_value("tls_cert", "tls/server.pem"),
        tls_key=t.path_value("tls_key", "tls/server-key.pem"),
        master_key=t.path_value("master_key", "master.key"),
        ek_roots=t.path_value("ek_roots", "ek-roots.pem"),
        enrollment=mode,
        nonce_ttl_seconds=t.integer("nonce_ttl_seconds", 60, 1, 3600),
        lease_seconds=lease,
        enrollment_ttl_seconds=t.integer("enrollment_ttl_seconds", 300, 1, 3600),
        admin_listen=_optional_listen(t, "admin_listen", "127.0.0.1:8444"),
        admin_ca=t.path_value("admin_ca", "tls/ca.pem"),
        admin_ca_key=t.path_value("admin_ca_key", "tls/ca-key.pem"),
        admin_certs=t.path_value("admin_certs", "admin-certs.json"),
        previous_master_keys=tuple(t.resolve(p) for p in previous),
        metrics_listen=_optional_listen(t, "metrics_listen", "127.0.0.1:9464"),
        signing_key=t.path_value("signing_key", "tls/signing-key.pem"),
        signing_cert=t.path_value("signing_cert", "tls/signing.pem"),
        limits=_limits(t),
        audit_retention_days=t.integer("audit_retention_days", 90, 0, 36_500),
        approval_ttl_seconds=t.integer("approval_ttl_seconds", lease, 1, lease),
        previous_signing_keys=tuple(t.resolve(p) for p in signing),
    )


def _listen(t: Table, key: str, default: str) -> tuple[str, int]:
    return parse_listen(t.text(key, default), f"{t.path}: `{key}`")


def _optional_listen(t: Table, key: str, default: str) -> tuple[str, int] | None:
    """A listen address, or None for ``""`` (that listener is off)."""
    text = t.text(key, default, empty=True)
    return parse_listen(text, f"{t.path}: `{key}`") if text else None


def _database(t: Table) -> Path | str:
    """``postgresql://...`` stays a URL; ``sqlite:///FILE`` or a plain path becomes a Path."""
    value = t.text("database", "kbs.db")
    if value.startswith(("postgresql://", "postgresql+psycopg://")):
        return value
    if "://" in value and not value.startswith("sqlite:///"):
        raise t.fail(
            "database",
            f"must be a SQLite file, sqlite:///FILE or a postgresql:// URL, got "
            f"{value.split('://')[0]}://...",
        )
    return t.resolve(value.removeprefix("sqlite:///"))


def _limits(t: Table) -> LimitSettings:
    d = DEFAULT_LIMITS
    return LimitSettings(
        rpc_deadline_seconds=t.number("rpc_deadline_seconds", d.rpc_deadline_seconds, 0.1, 600),
        rate_limit_peer_per_second=t.number(
            "rate_limit_peer_per_second", d.rate_limit_peer_per_second, 0, 1_000_000
        ),
        rate_limit_peer_burst=t.integer(
            "rate_limit_peer_burst", d.rate_limit_peer_burst, 1, 1_000_000
        ),
        rate_limit_node_per_second=t.number(
            "rate_limit_node_per_second", d.rate_limit_node_per_second, 0, 1_000_000
        ),
        rate_limit_node_burst=t.integer(
            "rate_limit_node_burst", d.rate_limit_node_burst, 1, 1_000_000
        ),
        rate_limit_ek_per_second=t.number(
            "rate_limit_ek_per_second", d.rate_limit_ek_per_second, 0, 1_000_000
        ),
        rate_limit_ek_burst=t.integer("rate_limit_ek_burst", d.rate_limit_ek_burst, 1, 1_000_000),
        max_inflight_per_peer=t.integer(
            "max_inflight_per_peer", d.max_inflight_per_peer, 1, 100_000
        ),
        max_concurrent_attestations=t.integer(
            "max_concurrent_attestations", d.max_concurrent_attestations, 1, 1024
        ),
        max_queued_attestations=t.integer(
            "max_queued_attestations", d.max_queued_attestations, 0, 100_000
        ),
        max_watch_streams_per_peer=t.integer(
            "max_watch_streams_per_peer", d.max_watch_streams_per_peer, 1, 1_000_000
        ),
        max_health_watches_per_peer=t.integer(
            "max_health_watches_per_peer", d.max_health_watches_per_peer, 0, 1_000
        ),
        max_connections=t.integer("max_connections", d.max_connections, 0, 10_000_000),
        max_connections_per_address=t.integer(
            "max_connections_per_address", d.max_connections_per_address, 0, 10_000_000
        ),
        handshake_timeout_seconds=t.number(
            "handshake_timeout_seconds", d.handshake_timeout_seconds, 0.1, 600
        ),
        idle_timeout_seconds=t.number("idle_timeout_seconds", d.idle_timeout_seconds, 1, 86_400),
    )

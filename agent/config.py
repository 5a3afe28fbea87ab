"""The agent's configuration: TOML, validated once at start-up, passed down as a frozen value.

Keys (all optional except ``kbs`` and ``kbs_ca``)::

    kbs = "kbs.example.net:8443"           # broker address, HOST:PORT
    kbs_ca = "/etc/keylease/agent-ca.pem"  # CA that signed the broker's TLS certificate
    tcti = "device:/dev/tpmrm0"            # TPM access; tests use "swtpm:path=/run/x/tpm.sock"
    state_dir = "/var/lib/keylease"        # AK blobs, enrollment record and challenge, sealed
                                           # release cache and the approvals that open it
    node_name = "worker-1"                 # default: the host name
    key_dirs = ["/etc/crio/keys", "/etc/containerd/ocicrypt/keys"]
    event_log = "/sys/kernel/security/tpm0/binary_bios_measurements"  # sent when present
    rpc_timeout_seconds = 10
    startup_timeout_seconds = 30           # `run`: READY=1 after this long even without keys
    retry_max_seconds = 60                 # `run`: cap of the exponential retry backoff
    remove_keys_on_stop = false            # `run`: remove installed keys on SIGTERM
    unsafe_allow_disk_key_dirs = false     # install into key dirs that are not on tmpfs (warns)

Relative paths resolve against the config file's directory.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from keylease.tomlfile import Table, read_toml

__all__ = ["DEFAULT_CONFIG", "AgentConfig", "load_config"]

DEFAULT_CONFIG = Path("/etc/keylease/agent.toml")
DEFAULT_KEY_DIRS = ("/etc/crio/keys", "/etc/containerd/ocicrypt/keys")
DEFAULT_EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"

_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_TCTI = re.compile(
    r"(device:/\S+|swtpm:(path=\S+|host=[^,\s]+,port=\d+)|mssim:host=[^,\s]+,port=\d+|tabrmd:\S*)"
)
_KNOWN = {
    "kbs",
    "kbs_ca",
    "tcti",
    "state_dir",
    "node_name",
    "key_dirs",
    "event_log",
    "rpc_timeout_seconds",
    "startup_timeout_seconds",
    "retry_max_seconds",
    "remove_keys_on_stop",
    "unsafe_allow_disk_key_dirs",
}


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    kbs: str
    kbs_ca: Path
    tcti: str
    state_dir: Path
    node_name: str
    key_dirs: tuple[Path, ...]
    event_log: Path | None
    rpc_timeout_seconds: float
    startup_timeout_seconds: float = 30.0
    retry_max_seconds: float = 60.0
    remove_keys_on_stop: bool = False
    unsafe_allow_disk_key_dirs: bool = False

    @property
    def kbs_host(self) -> str:
        return self.kbs.rpartition(":")[0].strip("[]")


def load_config(path: Path) -> AgentConfig:
    """Read and validate ``path``; raises ConfigError naming the file, key and fix."""
    raw = read_toml(
        path,
        ConfigError,
        missing_hint="write one (see `keylease-agent --help`) or pass --config",
    )
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> AgentConfig:
    t = Table(raw, path, ConfigError, _KNOWN)
    kbs = t.text("kbs")
    host, sep, port = kbs.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise t.fail("kbs", f'must be HOST:PORT (e.g. "kbs.example.net:8443"), got {kbs!r}')
    kbs_ca = t.path_value("kbs_ca")
    try:
        present = kbs_ca.is_file()
    except OSError as exc:  # e.g. a name too long (is_file answers False only for "missing")
        raise ConfigError(f"{path}: kbs_ca {kbs_ca} cannot be used: {exc.strerror}") from None
    if not present:
        raise ConfigError(
            f"{path}: kbs_ca {kbs_ca} does not exist; copy agent-ca.pem from the broker "
            "(written by `keylease-kbs init`)"
        )
    tcti = t.text("tcti", "device:/dev/tpmrm0")
    if not _TCTI.fullmatch(tcti):
        raise ConfigError(
            f'{path}: tcti {tcti!r} is not supported; use "device:/dev/tpmrm0" or '
            '"swtpm:path=/run/swtpm/sock" (a bare "swtpm" would talk to whatever listens on '
            "localhost:2321)"
        )
    node_name = t.text("node_name", socket.gethostname().split(".")[0])
    if not _NODE_NAME.fullmatch(node_name):
        raise ConfigError(
            f"{path}: node_name {node_name!r} is invalid: 1-63 characters from A-Z a-z 0-9 . _ -"
        )
    key_dir_names = t.strings("key_dirs", DEFAULT_KEY_DIRS, hint='["/etc/crio/keys"]')
    if not key_dir_names:
        raise t.fail("key_dirs", "must be a non-empty list of directory paths")
    key_dirs = tuple(t.resolve(d) for d in key_dir_names)
    if len(set(key_dirs)) != len(key_dirs):
        raise ConfigError(f"{path}: `key_dirs` lists a directory twice")
    for a in key_dirs:
        for b in key_dirs:
            if a != b and b.is_relative_to(a):
                raise ConfigError(f"{path}: key_dirs {b} is inside {a}; list each tree once")
    event_log = t.text("event_log", DEFAULT_EVENT_LOG, empty=True)
    return AgentConfig(
        path=path,
        kbs=kbs,
        kbs_ca=kbs_ca,
        tcti=tcti,
        state_dir=t.path_value("state_dir", "/var/lib/keylease"),
        node_name=node_name,
        key_dirs=key_dirs,
        event_log=Path(event_log) if event_log else None,
        rpc_timeout_seconds=t.number("rpc_timeout_seconds", 10, 1, 300),
        startup_timeout_seconds=t.number("startup_timeout_seconds", 30, 0, 3600),
        retry_max_seconds=t.number("retry_max_seconds", 60, 1, 3600),
        remove_keys_on_stop=t.flag("remove_keys_on_stop"),
        unsafe_allow_disk_key_dirs=t.flag("unsafe_allow_disk_key_dirs"),
    )

"""Config files: agent.toml and kbs.toml, through each program's loader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from agent import config as agent_config
from kbs import config as kbs_config
from scripts.fuzz_targets.common import ROOT, work

# --- config files ------------------------------------------------------------------------------


def _config_file(data: bytes) -> Path:
    """``data`` as a config file, next to an ``agent-ca.pem`` (relative paths resolve there, so
    seeds and corpus entries stay valid from one run to the next)."""
    ca = work() / "agent-ca.pem"
    if not ca.exists():
        ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    path = work() / "fuzz.toml"
    path.write_bytes(data)
    return path


def fuzz_agent_config(data: bytes) -> None:
    agent_config.load_config(_config_file(data))


def fuzz_kbs_config(data: bytes) -> None:
    kbs_config.load_config(_config_file(data))


def agent_config_seeds() -> Iterator[bytes]:
    yield (
        b'kbs = "kbs.example.net:8443"\nkbs_ca = "agent-ca.pem"\ntcti = "device:/dev/tpmrm0"\n'
        b'state_dir = "/var/lib/keylease"\nnode_name = "worker-1"\n'
        b'key_dirs = ["/etc/crio/keys", "/etc/containerd/ocicrypt/keys"]\nevent_log = ""\n'
        b"rpc_timeout_seconds = 10\nstartup_timeout_seconds = 30\nretry_max_seconds = 60.5\n"
        b"remove_keys_on_stop = false\nunsafe_allow_disk_key_dirs = false\n"
    )


def kbs_config_seeds() -> Iterator[bytes]:
    yield (ROOT / "tests" / "data" / "fuzz" / "kbs.toml").read_bytes()
    yield (
        b'listen = "[::]:8443"\ndatabase = "postgresql://kbs@db/kbs"\nenrollment = "ek-ca"\n'
        b'admin_listen = ""\nmetrics_listen = "127.0.0.1:0"\nprevious_master_keys = ["old.key"]\n'
        b"rate_limit_peer_per_second = 0\nmax_connections = 100\n"
    )

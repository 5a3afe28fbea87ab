"""A test node: one swtpm, a state dir, key dirs and an agent config pointing at a broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.blobs import NodeIdentity
from agent.config import AgentConfig, load_config
from agent.enroll import node_identity
from agent.keystore import key_file_name
from agent.state import StateDir
from agent.tpm import Tpm
from harness.broker import Broker, CliResult, agent, write_agent_config
from harness.swtpm import Swtpm

__all__ = ["Node"]


@dataclass
class Node:
    name: str
    tpm: Swtpm
    root: Path
    keys_root: Path  # on a tmpfs: the agent refuses key directories that would reach a disk
    broker: Broker
    config_extra: list[str] = field(default_factory=list)  # more agent.toml lines
    event_log: Path | None = None  # the boot event log the agent sends (none by default)
    via: str = ""  # the address the agent reaches the broker at (e.g. a SourceProxy); "": direct

    @property
    def config_path(self) -> Path:
        return self.root / "agent.toml"

    @property
    def key_dirs(self) -> tuple[Path, Path]:
        return (self.keys_root / "crio-keys", self.keys_root / "containerd-keys")

    def key_file(self, key: str, key_dir: int = 0, *, version: int = 1) -> Path:
        """Where the agent installs version ``version`` of ``key``: ``<name>.v<N>.pem``."""
        return self.key_dirs[key_dir] / "keylease" / key_file_name(key, version)

    def write_config(self) -> Path:
        return write_agent_config(
            self.config_path,
            broker=self.broker,
            tcti=self.tpm.tcti,
            state_dir=self.root / "state",
            key_dirs=self.key_dirs,
            node_name=self.name,
            extra_lines=self.config_extra,
            event_log=self.event_log,
            address=self.via,
        )

    def config(self) -> AgentConfig:
        return load_config(self.write_config())

    def attest(self) -> CliResult:
        self.write_config()
        return agent(self.config_path, "attest", "--once")

    def identity(self) -> NodeIdentity:
        """The node's call credentials, recovered with its TPM as the agent does (it must have
        enrolled, e.g. by ``attest()``)."""
        cfg = self.config()
        with Tpm.open(cfg.tcti) as tpm:
            found = node_identity(cfg, tpm, StateDir.open(cfg.state_dir))
        if found is None:
            raise RuntimeError(f"node {self.name} has not enrolled with {self.broker.address}")
        return found

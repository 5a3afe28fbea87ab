"""podman and buildah for the runtime tests, on a private containers-storage and configuration.

Everything a pull or a run writes lives under one directory: storage (graph root, run root),
libpod's tmp_dir, the network config dir and TMPDIR; the registries config and signature policy
are the test's own (plain HTTP to the registry on 127.0.0.1). What remains outside is what
rootful podman hard-codes: runc's state root /run/runc (empty again after ``--rm``) and, for
podman 5, netavark's /run/containers/networks and /run/lock/netavark.lock (empty).

Debian 12's podman 4.3 has no ``--decryption-key`` (it came in 4.4): ``buildah pull
--decryption-key`` fills the storage and podman runs from it. Debian 13's podman 5.4 pulls with
``--decryption-key`` itself. A directory is refused as ``--decryption-key`` ("is a directory"):
one flag per key file. Containers run with ``--network none`` and ``--cgroup-manager cgroupfs``,
with explicit nofile/nproc ulimits: without them runc fails here with "error setting rlimit type
7: operation not permitted" (no CAP_SYS_RESOURCE to raise the defaults). No pytest imports.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ContainerToolError", "Podman"]

TIMEOUT = 120
RUN_FLAGS = (
    "--rm",
    "--network",
    "none",
    "--cgroup-manager",
    "cgroupfs",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
)


class ContainerToolError(RuntimeError):
    """podman, buildah or skopeo failed; ``stderr`` is the tool's own message."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} failed (exit {returncode}): {stderr}")
        self.returncode = returncode
        self.stderr = stderr


def _toml_list(values: Sequence[str | Path]) -> str:
    return "[" + ", ".join(json.dumps(str(v)) for v in values) + "]"


class Podman:
    """One podman (with buildah beside it for Debian 12's podman 4.3) on the storage and config
    under ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        podman: Path,
        runc: Path,
        conmon: Path,
        buildah: Path | None = None,
        helpers: Path | None = None,
    ) -> None:
        self.directory = directory
        self.podman = podman
        self.runc = runc
        self.buildah = buildah
        for sub in ("graph", "run", "libpod", "networks", "tmp", "home"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        (directory / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f"graphroot = {json.dumps(str(directory / 'graph'))}\n"
            f"runroot = {json.dumps(str(directory / 'run'))}\n"
        )
        engine = [
            "[engine]",
            'cgroup_manager = "cgroupfs"',
            'events_logger = "none"',
            f"tmp_dir = {json.dumps(str(directory / 'libpod'))}",
            f"conmon_path = {_toml_list([conmon])}",
        ]
        if helpers is not None:
            engine.append(f"helper_binaries_dir = {_toml_list([helpers])}")
        (directory / "containers.conf").write_text(
            "\n".join(
                [
                    "[containers]",
                    'netns = "none"',
                    *engine,
                    "[network]",
                    f"network_config_dir = {json.dumps(str(directory / 'networks'))}",
                    "",
                ]
            )
        )
        (directory / "registries.conf").write_text("unqualified-search-registries = []\n")
        (directory / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )

    def _env(self) -> dict[str, str]:
        d = self.directory
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(d / "home"),
            "TMPDIR": str(d / "tmp"),
            "CONTAINERS_CONF": str(d / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(d / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(d / "registries.conf"),
            "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",
            "LANG": "C.UTF-8",
        }

    def _run(self, argv: Sequence[str]) -> str:
        try:
            proc = subprocess.run(
                list(argv),
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ContainerToolError(argv, -1, str(exc)) from exc
        if proc.returncode != 0:
            raise ContainerToolError(argv, proc.returncode, proc.stderr.strip())
        return proc.stdout

    def _pull_flags(self, keys: Sequence[Path]) -> list[str]:
        return [
            "--tls-verify=false",
            "--signature-policy",
            str(self.directory / "policy.json"),
            *(arg for key in keys for arg in ("--decryption-key", str(key))),
        ]

    def buildah_pull(self, reference: str, keys: Sequence[Path]) -> str:
        """``buildah pull --decryption-key KEY... docker://REFERENCE`` into this storage; the
        image id."""
        if self.buildah is None:
            raise ValueError("this Podman has no buildah")
        argv = [str(self.buildah), "pull", "--quiet", *self._pull_flags(keys)]
        return self._run([*argv, f"docker://{reference}"]).strip()

    def pull(self, reference: str, keys: Sequence[Path]) -> str:
        """``podman pull --decryption-key KEY... docker://REFERENCE`` (podman >= 4.4); the id."""
        argv = [str(self.podman), "pull", "--quiet", *self._pull_flags(keys)]
        return self._run([*argv, f"docker://{reference}"]).strip()

    def run(self, image: str, *command: str) -> str:
        """``podman run --rm ... IMAGE COMMAND`` from this storage (never pulls); its stdout."""
        argv = [str(self.podman), "run", "--pull", "never", "--runtime", str(self.runc)]
        return self._run([*argv, *RUN_FLAGS, image, *command])

    def version(self) -> str:
        return self._run([str(self.podman), "--version"]).strip()

"""A private containerd for the runtime tests: Debian 12's containerd 1.6 with its CRI plugin
configured the way a Kubernetes node decrypts images (``image_decryption.key_model = "node"``,
ctd-decoder as the ocicrypt stream processor reading a key directory), its root, state, sockets
and config in one directory, a registry on 127.0.0.1 reached over plain HTTP, and nothing
system-wide (no /run/containerd, /var/lib/containerd, /opt/containerd; no TCP but the CRI's
streaming server on 127.0.0.1). No pytest imports."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from harness.cri import CriClient, CriError, RuntimeVersion

__all__ = ["Containerd", "containerd_config", "hosts_toml"]

START_TIMEOUT = 30.0
ENCRYPTED_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
ENCRYPTED_TAR = "application/vnd.oci.image.layer.v1.tar+encrypted"
CRI = 'plugins."io.containerd.grpc.v1.cri"'
# Plugins that would look for system resources the tests do not use.
DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def _toml(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def containerd_config(directory: Path, ctd_decoder: Path, key_dir: Path) -> str:
    """containerd's config.toml (version 2): everything under ``directory``; CRI decryption with
    the node key model; ``ctd-decoder --decryption-keys-path KEY_DIR`` for both encrypted layer
    media types; registry hosts from ``directory/certs.d`` (``hosts_toml``)."""
    decoder = [
        f"path = {_toml(ctd_decoder)}",
        f"args = [{_toml('--decryption-keys-path')}, {_toml(key_dir)}]",
    ]
    return "\n".join(
        [
            "version = 2",
            f"root = {_toml(directory / 'root')}",
            f"state = {_toml(directory / 'state')}",
            "disabled_plugins = [" + ", ".join(_toml(p) for p in DISABLED_PLUGINS) + "]",
            "[grpc]",
            f"  address = {_toml(directory / 'containerd.sock')}",
            "[ttrpc]",
            f"  address = {_toml(directory / 'containerd.sock.ttrpc')}",
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml(directory / 'opt')}",
            f"[{CRI}]",
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  enable_selinux = false",
            f"  [{CRI}.containerd]",
            '    snapshotter = "overlayfs"',
            f"  [{CRI}.cni]",
            f"    bin_dir = {_toml(directory / 'cni' / 'bin')}",
            f"    conf_dir = {_toml(directory / 'cni' / 'conf')}",
            f"  [{CRI}.image_decryption]",
            '    key_model = "node"',
            f"  [{CRI}.registry]",
            f"    config_path = {_toml(directory / 'certs.d')}",
            "[stream_processors]",
            '  [stream_processors."io.containerd.ocicrypt.decoder.v1.tar.gzip"]',
            f"    accepts = [{_toml(ENCRYPTED_GZIP)}]",
            '    returns = "application/vnd.oci.image.layer.v1.tar+gzip"',
            *(f"    {line}" for line in decoder),
            '  [stream_processors."io.containerd.ocicrypt.decoder.v1.tar"]',
            f"    accepts = [{_toml(ENCRYPTED_TAR)}]",
            '    returns = "application/vnd.oci.image.layer.v1.tar"',
            *(f"    {line}" for line in decoder),
            "",
        ]
    )


def hosts_toml(host: str) -> str:
    """certs.d/HOST/hosts.toml: pull and resolve from HOST over plain HTTP."""
    return "\n".join(
        [
            f'server = "http://{host}"',
            f'[host."http://{host}"]',
            '  capabilities = ["pull", "resolve"]',
            "",
        ]
    )


class Containerd:
    """``containerd --config DIR/config.toml`` in the background; ``cri()`` is a CRI client on
    its socket."""

    def __init__(
        self,
        directory: Path,
        *,
        binary: Path,
        ctd_decoder: Path,
        key_dir: Path,
        insecure_registries: Sequence[str],
    ) -> None:
        self.directory = directory
        self.binary = binary
        self.config_path = directory / "config.toml"
        self.log_path = directory / "containerd.log"
        self.socket = directory / "containerd.sock"
        self.config_text = containerd_config(directory, ctd_decoder, key_dir)
        self.insecure_registries = tuple(insecure_registries)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RuntimeVersion:
        """Write the config, start containerd, wait until the CRI answers; its version."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for sub in ("cni/bin", "cni/conf"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        for host in self.insecure_registries:
            hosts = self.directory / "certs.d" / host / "hosts.toml"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text(hosts_toml(host))
        self.config_path.write_text(self.config_text)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(self.binary), "--config", str(self.config_path)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self._proc.returncode}: {self.log()}")
            if self.socket.exists():
                with self.cri() as cri:
                    try:
                        return cri.version(timeout=2)
                    except CriError:
                        pass  # the CRI plugin is not serving yet
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd's CRI not answering after {START_TIMEOUT} s")
            time.sleep(0.05)

    def cri(self) -> CriClient:
        return CriClient(self.socket)

    def unpacked(self, name: str) -> list[bytes]:
        """The content of file ``name`` in every unpacked layer (overlayfs snapshot) that has
        it: what a pull decrypted and extracted, read back from the snapshotter's store."""
        snapshots = self.directory / "root" / "io.containerd.snapshotter.v1.overlayfs"
        pattern = f"snapshots/*/fs/{name.strip('/')}"
        return [path.read_bytes() for path in sorted(snapshots.glob(pattern)) if path.is_file()]

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

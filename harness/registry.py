"""A real OCI registry for the runtime tests: Debian's ``docker-registry`` (distribution 2.8)
serving plain HTTP on 127.0.0.1 only, with its storage in a private directory. Images reach it
with skopeo (``push``). No pytest imports."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from harness.oci import MANIFEST, skopeo_push

__all__ = ["Registry"]

START_TIMEOUT = 20.0
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


LISTENING = re.compile(r'msg="listening on 127\.0\.0\.1:(\d+)"')


class Registry:
    """``docker-registry serve`` on 127.0.0.1:0 (the port it picked is read from its log);
    ``host`` is what image names start with."""

    def __init__(self, directory: Path, binary: Path) -> None:
        self.directory = directory
        self.binary = binary
        self.port = 0
        self.log_path = directory / "registry.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "config.yml"
        # The registry's YAML parser accepts JSON; nothing but loopback, no auth, no debug port.
        config.write_text(
            json.dumps(
                {
                    "version": 0.1,
                    "log": {"level": "info", "accesslog": {"disabled": True}},
                    "storage": {
                        "filesystem": {"rootdirectory": str(self.directory / "data")},
                        "delete": {"enabled": True},
                    },
                    "http": {"addr": "127.0.0.1:0", "secret": "keylease-test-registry"},
                }
            )
        )
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(self.binary), "serve", str(config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self._proc.returncode}: {self.log()}")
            if not self.port and (found := LISTENING.search(self.log())):
                self.port = int(found.group(1))
            if self.port:
                try:
                    with DIRECT.open(f"http://{self.host}/v2/", timeout=2) as reply:
                        if reply.status == 200:
                            return self
                except (OSError, urllib.error.URLError):
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry not answering after {START_TIMEOUT} s")
            time.sleep(0.05)

    def push(self, layout: Path, tag: str, name: str, recipients: Sequence[Path] = ()) -> str:
        """Push ``oci:layout:tag`` as ``HOST/name:tag``, JWE-encrypted to ``recipients`` (public
        key files) if any; checks the stored manifest's layers are (or are not) encrypted.
        Returns the image reference."""
        reference = f"{self.host}/{name}:{tag}"
        skopeo_push(layout, tag, reference, recipients)
        types = self.layer_types(name, tag)
        if not types or any(t.endswith("+encrypted") != bool(recipients) for t in types):
            raise RuntimeError(f"{reference} was stored with layers {types}")
        return reference

    def layer_types(self, name: str, tag: str) -> list[str]:
        """The media types of the layers of ``name:tag`` as the registry serves them."""
        request = urllib.request.Request(
            f"http://{self.host}/v2/{name}/manifests/{tag}", headers={"Accept": MANIFEST}
        )
        with DIRECT.open(request, timeout=10) as reply:
            manifest = json.load(reply)
        return [str(layer["mediaType"]) for layer in manifest["layers"]]

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Where the container-runtime binaries are: Debian 12's packages and the Debian 13 (trixie)
pieces `scripts/setup-trixie.sh` unpacks into its cache. The one place tests, benchmarks and the
demo look them up; a missing binary raises ``RuntimeToolMissing`` naming ``make setup``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RuntimeToolMissing", "RuntimeTools", "runtime_tools", "trixie_cache"]

# Debian 12 packages (scripts/setup.sh) -> the binaries the runtime tests run.
DEBIAN_12 = {
    "containerd": "containerd",
    "runc": "runc",
    "docker-registry": "docker-registry",
    "buildah": "buildah",
    "podman": "podman",
    "conmon": "conmon",
    "busybox": "busybox-static",
}
# Debian 13 binaries in the cache's bin/ (scripts/setup-trixie.sh): skopeo, podman and netavark
# carry trixie's loader and libraries as their ELF interpreter and RPATH.
TRIXIE = ("ctd-decoder", "skopeo", "podman", "netavark")
CRI_API_PROTO = "usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto"


class RuntimeToolMissing(RuntimeError):
    """A runtime binary is not installed (run ``make setup``)."""


def trixie_cache() -> Path:
    """The Debian 13 tree (``$KEYLEASE_TRIXIE_CACHE``, default /var/cache/keylease-trixie)."""
    return Path(os.environ.get("KEYLEASE_TRIXIE_CACHE", "/var/cache/keylease-trixie")) / "current"


@dataclass(frozen=True)
class RuntimeTools:
    containerd: Path
    runc: Path
    docker_registry: Path
    buildah: Path
    podman: Path  # Debian 12: podman 4.3 (no --decryption-key; buildah pulls for it)
    conmon: Path
    busybox: Path  # statically linked: the program inside the test images
    ctd_decoder: Path  # imgcrypt 1.1.11 (trixie), containerd's ocicrypt stream processor
    skopeo_trixie: Path  # skopeo 1.18 (ocicrypt 1.1.10)
    podman_trixie: Path  # podman 5.4
    trixie_helpers: Path  # podman 5's helper_binaries_dir (netavark)
    cri_api_proto: Path  # upstream CRI api.proto (golang-github-kubernetes-cri-api-dev)


def runtime_tools() -> RuntimeTools:
    """Every runtime binary, or ``RuntimeToolMissing`` listing all that are missing."""
    missing: list[str] = []
    found: dict[str, Path] = {}
    for tool, package in DEBIAN_12.items():
        where = shutil.which(tool, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/bin")
        if where is None:
            missing.append(f"{tool} (Debian 12 package {package})")
        else:
            found[tool] = Path(where)
    cache = trixie_cache()
    for tool in TRIXIE:
        path = cache / "bin" / tool
        if not (path.is_file() and os.access(path, os.X_OK)):
            missing.append(f"{path} (Debian 13, scripts/setup-trixie.sh)")
    proto = cache / "root" / CRI_API_PROTO
    if not proto.is_file():
        missing.append(f"{proto} (Debian 13 golang-github-kubernetes-cri-api-dev)")
    if missing:
        raise RuntimeToolMissing(
            "container-runtime tools missing: " + "; ".join(missing) + ". Run `make setup` "
            "(scripts/setup.sh) as root: it installs them and is quick when nothing is missing."
        )
    return RuntimeTools(
        containerd=found["containerd"],
        runc=found["runc"],
        docker_registry=found["docker-registry"],
        buildah=found["buildah"],
        podman=found["podman"],
        conmon=found["conmon"],
        busybox=found["busybox"],
        ctd_decoder=cache / "bin" / "ctd-decoder",
        skopeo_trixie=cache / "bin" / "skopeo",
        podman_trixie=cache / "bin" / "podman",
        trixie_helpers=cache / "bin",
        cri_api_proto=proto,
    )

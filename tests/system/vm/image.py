"""The VM acceptance test's guest image: Debian 12 (mmdebstrap) + Debian's cloud kernel, with
keylease installed from wheels built on the host by vm/provision/install-agent.sh.

Two cached layers under ``cache_dir()`` (``$KEYLEASE_VM_CACHE``, default /var/cache/keylease-vm),
each keyed by a hash of its inputs, so a rerun with nothing changed builds nothing:

- ``base-<hash>/``: ``rootfs.tar`` (mmdebstrap, needs Debian's archive once) and ``vmlinuz``.
- ``image-<hash>.ext4``: the base plus the project's wheels (at the versions this environment
  resolved, ``pip freeze``, which are part of the hash), units and the test's guest files; the
  ``KEEP_IMAGES`` newest are kept.

Needs root (mmdebstrap --mode=root, chroot). Builds run under a lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.wheelhouse import build_wheelhouse, pinned_versions, project_wheel

__all__ = ["GuestImage", "build_image", "cache_dir"]

REPO = Path(__file__).resolve().parents[3]
GUEST = Path(__file__).resolve().parent / "guest"
PROVISION = REPO / "vm" / "provision"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
KEEP_IMAGES = 3
PACKAGES = (
    *("systemd-sysv", "udev", "kmod", "python3", "python3-venv", "tpm-udev", "skopeo"),
    *("libtss2-esys-3.0.2-0", "libtss2-tctildr0", "libtss2-tcti-device0", "libtss2-fapi1"),
    *("libtss2-rc0", "libtss2-mu0", "libtss2-sys1"),
)
# Guest modules (the cloud kernel builds virtio as modules): the NIC and fw_cfg.
MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_net",
    "net_failover",
    "failover",
)
GUEST_KBS = "8443"  # the port the guest dials; qemu's guestfwd maps it to the host broker


@dataclass(frozen=True)
class GuestImage:
    ext4: Path
    kernel: Path
    kernel_version: str


def cache_dir() -> Path:
    return Path(os.environ.get("KEYLEASE_VM_CACHE", "/var/cache/keylease-vm"))


SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _run(argv: list[str], **kwargs: object) -> None:
    """Run a build command; inside the guest's chroot only the guest's standard PATH applies."""
    env = dict(os.environ, PATH=SAFE_PATH + ":" + os.environ.get("PATH", ""))
    if argv[0] == "chroot":  # nothing of the host's environment (PIP_*, ...) reaches the guest
        env = {"PATH": SAFE_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    kwargs.setdefault("stdout", subprocess.DEVNULL)
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, env=env, **kwargs)  # type: ignore[call-overload]


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _tree_bytes(paths: list[Path]) -> bytes:
    out = b""
    for p in sorted(p for p in paths if p.is_file()):  # not __pycache__/
        out += p.name.encode() + b"\0" + p.read_bytes() + b"\0"
    return out


def _kernel_version() -> str:
    out = subprocess.run(
        ["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends: ")
        if dep.startswith("linux-image-") and dep != KERNEL_PACKAGE:
            return dep.removeprefix("linux-image-")
    raise RuntimeError(f"apt-cache depends {KERNEL_PACKAGE}: no kernel package; apt-get update")


BASE_HOOK = """set -e
root=$1
printf '/dev/nvme0n1 / ext4 rw,errors=remount-ro 0 1\\nLABEL=klseed /seed ext4 ro,nofail 0 0\\n' \
  > "$root/etc/fstab"
mkdir -p "$root/seed"
echo kl-worker > "$root/etc/hostname"
printf '127.0.0.1 localhost\\n127.0.1.1 kl-worker\\n' > "$root/etc/hosts"
chroot "$root" systemd-machine-id-setup
printf '[Match]\\nName=en* eth*\\n[Network]\\nAddress=10.0.2.15/24\\nGateway=10.0.2.2\\n' \
  > "$root/etc/systemd/network/10-slirp.network"
chroot "$root" systemctl enable systemd-networkd.service
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
  e2scrub_reap.service fstrim.timer getty@tty1.service serial-getty@ttyS0.service \
  systemd-networkd-wait-online.service
"""


def _build_base(directory: Path, version: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="build-", dir=directory.parent))
    try:
        hook = work / "hook.sh"
        hook.write_text(BASE_HOOK)
        _run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--mode=root",
                "--include=" + ",".join(PACKAGES),
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                f"--customize-hook=sh {hook} $1",
                "bookworm",
                str(work / "rootfs.tar"),
                "http://deb.debian.org/debian",
            ],
            stdout=subprocess.DEVNULL,
        )
        _run(
            [
                "apt-get",
                "download",
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                f"linux-image-{version}",
            ],
            cwd=work,
        )
        deb = next(work.glob(f"linux-image-{version}_*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(work / "kernel")])
        shutil.copy(work / "kernel" / "boot" / f"vmlinuz-{version}", work / "vmlinuz")
        # Only the modules the guest loads (with what they depend on), plus depmod's index.
        mods = work / "kernel" / "lib" / "modules" / version
        keep = work / "modules" / "lib" / "modules" / version
        for name in MODULES:
            for found in mods.rglob(f"{name}.ko*"):
                dest = keep / found.relative_to(mods)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(found, dest)
        for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            if (mods / meta).exists():
                shutil.copy(mods / meta, keep / meta)
        _run(["tar", "-C", str(work / "modules"), "-cf", str(work / "modules.tar"), "lib"])
        directory.mkdir()
        for name in ("rootfs.tar", "vmlinuz", "modules.tar"):
            (work / name).rename(directory / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_wheels(out: Path) -> list[Path]:
    """The dependency wheelhouse (harness.wheelhouse, built once per pin set) plus the project's
    wheel from the tree; the guest is a worker node and installs ``keylease[agent]`` from them,
    offline (nothing of the broker is installed)."""
    shutil.copytree(build_wheelhouse(), out)
    project_wheel(out)
    return sorted(out.glob("*.whl"))


def _prune(cache: Path, keep: Path) -> None:
    """Drop all but the newest ``KEEP_IMAGES`` project images (``keep`` always stays)."""
    images = sorted(cache.glob("image-*.ext4"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in images if p != keep][KEEP_IMAGES - 1 :]:
        old.unlink(missing_ok=True)


def _project_files() -> list[Path]:
    src = [p for d in ("agent", "kbs", "keylease") for p in (REPO / d).rglob("*.py")]
    return [*src, REPO / "pyproject.toml", *sorted((REPO / "systemd").iterdir())]


def _build_image(target: Path, base: Path, version: str, wheels: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="image-", dir=target.parent))
    try:
        root = work / "root"
        root.mkdir()
        _run(["tar", "-C", str(root), "-xf", str(base / "rootfs.tar")])
        _run(["tar", "-C", str(root / "usr"), "-xf", str(base / "modules.tar")])  # lib/ is usr/lib
        _run(["chroot", str(root), "depmod", version])
        stage = root / "tmp" / "keylease"
        shutil.copytree(wheels, stage / "wheels")
        shutil.copytree(REPO / "systemd", stage / "systemd")
        shutil.copytree(PROVISION, stage / "provision")
        # agent.toml's broker address is per run: the seed disk replaces this placeholder.
        _run(
            [
                "chroot",
                str(root),
                "/bin/sh",
                "/tmp/keylease/provision/install-agent.sh",
                "/tmp/keylease/wheels",
                "/tmp/keylease/systemd",
                f"broker.invalid:{GUEST_KBS}",
                "kl-worker",
            ]
        )
        shutil.rmtree(stage)
        lib = root / "usr" / "local" / "lib" / "keylease-vm"
        lib.mkdir(parents=True)
        for f in GUEST.iterdir():
            if f.suffix in (".service",):
                shutil.copy(f, root / "etc" / "systemd" / "system" / f.name)
            elif f.suffix == ".py":
                shutil.copy(f, lib / f.name)
        _run(["chroot", str(root), "systemctl", "enable", "keylease-vm-probe.service"])
        _run(["chroot", str(root), "systemctl", "enable", "keylease-vm-seed.service"])
        tmp = work / "image.ext4"
        _run(
            ["mke2fs", "-q", "-t", "ext4", "-L", "klroot", "-d", str(root), str(tmp), "1G"],
        )
        tmp.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_image(log: list[str] | None = None) -> GuestImage:
    """The cached image for the current tree, building what is missing."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        version = _kernel_version()
        base = cache / (
            "base-"
            + _hash(version.encode(), " ".join([*PACKAGES, *MODULES]).encode(), BASE_HOOK.encode())
        )
        if not base.exists():
            (log if log is not None else []).append(f"building {base.name}")
            _build_base(base, version)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            wheels = Path(tmp) / "wheels"
            pins = pinned_versions()
            project = _hash(
                pins,
                _tree_bytes(_project_files()),
                _tree_bytes(sorted(PROVISION.iterdir())),
                _tree_bytes(sorted(GUEST.iterdir())),
                Path(__file__).read_bytes(),  # the recipe itself
            )
            stamp = cache / f"image-{base.name}-{project}.ext4"
            if not stamp.exists():
                (log if log is not None else []).append(f"building {stamp.name}")
                build_wheels(wheels)
                _build_image(stamp, base, version, wheels)
                _prune(cache, stamp)
        return GuestImage(ext4=stamp, kernel=base / "vmlinuz", kernel_version=version)


if __name__ == "__main__":
    steps: list[str] = []
    image = build_image(steps)
    print("\n".join([*steps, str(image)]))

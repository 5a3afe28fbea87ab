"""Benchmark: what decryption costs a Kubernetes node's image pull (containerd CRI + ctd-decoder).

Everything real, on loopback: an swtpm with an EK certificate, the broker over TLS, the agent
(`keylease-agent attest --once`) installing the granted key into containerd's key directory, one
file per version (`image.v1.pem` ... `image.vN.pem`: the key is rotated N-1 times and the images
are encrypted to the current version, so ctd-decoder loads every file and tries the older ones),
Debian's registry on 127.0.0.1, Debian 12's containerd 1.6 with ctd-decoder (Debian 13's
imgcrypt) as its stream processor, pulls through the CRI's `ImageService.PullImage` as kubelet
does them. Each run pulls four new images, every layer random and unique (containerd skips
layers it has already unpacked): 1 layer and N layers, each plain and JWE-encrypted to the
agent's key; the figure is the PullImage wall time. Layers are gzip-compressed random bytes,
so their size is what travels and what is decrypted.

    .venv/bin/python -m scripts.bench_runtimes [--runs 7] [--layers 20] [--layer-kib 1024]
        [--key rsa-3072|ec-p256] [--versions 2]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from harness.broker import Broker, agent, write_agent_config
from harness.containerd import Containerd
from harness.cri import CriClient
from harness.keys import write_key
from harness.oci import make_layered_image
from harness.registry import Registry
from harness.runtimes import RuntimeToolMissing, runtime_tools
from harness.swtpm import Swtpm, SwtpmCa


def _new_key(kind: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if kind == "rsa-3072":
        return rsa.generate_private_key(65537, 3072)
    return ec.generate_private_key(ec.SECP256R1())


def must(result: object) -> None:
    if getattr(result, "returncode", 1) != 0:
        raise SystemExit(f"bench: step failed: {result!r}")


class Pusher:
    """New images with random, unique layers, pushed plain or encrypted to ``public``."""

    def __init__(self, registry: Registry, work: Path, public: Path, layer_bytes: int) -> None:
        self.registry = registry
        self.work = work
        self.public = public
        self.layer_bytes = layer_bytes
        self.count = 0

    def push(self, layers: int, encrypted: bool) -> str:
        self.count += 1
        layout = self.work / f"image-{self.count}"
        make_layered_image(
            layout,
            "v1",
            [{f"layer-{n}.bin": os.urandom(self.layer_bytes)} for n in range(layers)],
        )
        recipients = [self.public] if encrypted else []
        reference = self.registry.push(layout, "v1", f"bench/image-{self.count}", recipients)
        shutil.rmtree(layout)
        return reference


def _summary(label: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    return (
        f"  {label:<28} median {statistics.median(ms):7.1f} ms   "
        f"min {ms[0]:7.1f}   max {ms[-1]:7.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--layer-kib", type=int, default=1024)
    parser.add_argument("--key", choices=["ec-p256", "rsa-3072"], default="rsa-3072")
    parser.add_argument("--versions", type=int, default=2, help="key versions installed")
    args = parser.parse_args()
    if args.versions < 1:
        parser.error("--versions must be at least 1")
    try:
        tools = runtime_tools()
    except RuntimeToolMissing as exc:
        raise SystemExit(f"bench: {exc}") from None
    os.environ.setdefault("TSS2_LOG", "esys+none")
    shapes = [(1, False), (1, True), (args.layers, False), (args.layers, True)]
    times: dict[tuple[int, bool], list[float]] = {shape: [] for shape in shapes}
    with (
        tempfile.TemporaryDirectory(prefix="kl-bench-") as tmp,
        tempfile.TemporaryDirectory(prefix="keylease-bench-", dir="/dev/shm") as keys,
    ):
        work = Path(tmp)
        key_dir = Path(keys) / "containerd-keys"
        key_dir.mkdir()
        ca = SwtpmCa(work / "ca")
        (work / "roots.pem").write_bytes(ca.bundle_pem())
        tpm_dir = work / "tpm"
        tpm_dir.mkdir()
        (tpm_dir / "tpm2-00.permall").write_bytes((ca.golden / "tpm2-00.permall").read_bytes())
        broker = Broker(work / "kbs", work / "roots.pem")
        registry = Registry(work / "registry", tools.docker_registry)
        with Swtpm(tpm_dir) as tpm, broker, registry:
            cfg = write_agent_config(
                work / "agent.toml",
                broker=broker,
                tcti=tpm.tcti,
                state_dir=work / "state",
                key_dirs=[key_dir],
                node_name="bench-1",
            )
            if agent(cfg, "attest", "--once").returncode != 3:
                raise SystemExit("bench: first attestation did not end pending")
            key_path = write_key(work / "image-key.pem", _new_key(args.key))
            must(broker.kbs("node", "approve", "bench-1", "--label", "role=bench"))
            must(broker.kbs("policy", "set", "p", "--pcrs", "0,7", "--from-node", "bench-1"))
            must(broker.kbs("policy", "assign", "p", "--selector", "role=bench"))
            must(broker.kbs("key", "import", "image", "--private-key", str(key_path)))
            must(broker.kbs("grant", "add", "image", "--selector", "role=bench"))
            for rotation in range(2, args.versions + 1):
                key_path = write_key(work / f"image-key-v{rotation}.pem", _new_key(args.key))
                must(broker.kbs("key", "rotate", "image", "--private-key", str(key_path)))
            must(agent(cfg, "attest", "--once"))
            installed = sorted(p.name for p in (key_dir / "keylease").iterdir())
            expected = sorted(f"image.v{v}.pem" for v in range(1, args.versions + 1))
            if installed != expected:
                raise SystemExit(f"bench: the agent installed {installed}, not {expected}")

            containerd = Containerd(
                work / "ctd",
                binary=tools.containerd,
                ctd_decoder=tools.ctd_decoder,
                key_dir=key_dir,
                insecure_registries=[registry.host],
            )
            version = containerd.start()
            pusher = Pusher(registry, work, key_path.with_suffix(".pub"), args.layer_kib * 1024)
            try:
                with CriClient(containerd.socket) as cri:
                    for run in range(args.runs + 1):  # run 0 warms up and is not counted
                        for layers, encrypted in shapes:
                            reference = pusher.push(layers, encrypted)
                            pulled = cri.pull_image(reference)
                            if run:
                                times[layers, encrypted].append(pulled.seconds)
            finally:
                containerd.stop()

    command = ".venv/bin/python -m scripts.bench_runtimes " + shlex.join(sys.argv[1:])
    print(f"$ {command.strip()}")
    print(
        f"CRI PullImage wall time, {version.runtime_name} {version.runtime_version} + ctd-decoder "
        f"(imgcrypt, {tools.ctd_decoder}), registry on 127.0.0.1; {args.runs} runs (+1 warm-up), "
        f"every layer new: {args.layer_kib} KiB of random bytes, gzip; key {args.key}, "
        f"{args.versions} version(s) installed by keylease-agent as files {', '.join(installed)}; "
        f"images encrypted to the current version (v{args.versions})"
    )
    for layers in (1, args.layers):
        plain, sealed = times[layers, False], times[layers, True]
        print(_summary(f"{layers} layer(s), plain", plain))
        print(_summary(f"{layers} layer(s), encrypted", sealed))
        ratio = statistics.median(sealed) / statistics.median(plain)
        extra = (statistics.median(sealed) - statistics.median(plain)) * 1000 / layers
        print(f"  {layers} layer(s): decryption overhead x{ratio:.2f} ({extra:+.1f} ms per layer)")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"(benchmark took {time.monotonic() - started:.0f} s)")
    sys.exit(code)

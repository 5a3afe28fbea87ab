"""The runtimes a Kubernetes node really runs decrypt with what keylease-agent installs.

Real binaries on loopback only: Debian's registry on 127.0.0.1, Debian 12's containerd 1.6
driven through the CRI as kubelet drives it (``ImageService.PullImage``) with ctd-decoder
(Debian 13's imgcrypt) reading the agent's key directory, Debian 12's buildah 1.28 + podman
4.3, Debian 13's podman 5.4 and skopeo 1.18. The broker and the agent run through their CLIs.
Every image a test pulls has a layer of its own: containerd reuses an unpacked layer by its
plaintext chain id without asking for a key.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import shutil
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.descriptor import FieldDescriptor

from agent.config import DEFAULT_KEY_DIRS
from harness.broker import Broker
from harness.containerd import Containerd, containerd_config
from harness.cri import CriError, api_pb2
from harness.keys import write_key
from harness.nodes import Node
from harness.oci import make_oci_image, read_file_from_image, skopeo_fetch
from harness.operator import grant_node, ok
from harness.podman import ContainerToolError, Podman
from harness.registry import Registry
from harness.runtimes import RuntimeToolMissing, RuntimeTools, runtime_tools

NodeFactory = Callable[..., Node]
ContainerdFactory = Callable[[Node], Containerd]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# The runtime's own messages (ocicrypt, through ctd-decoder and containerd's CRI).
MISSING_KEY = "missing private key needed for decryption"  # no key file at all
WRONG_KEY = "none of the private keys could be used for decryption"  # none that opens it
# containerd 1.6 sometimes reports the failed decryption as the digest check of the (empty)
# output of the stream processor, instead of ctd-decoder's own message (notes/ocicrypt.md): the
# pull fails either way and nothing is unpacked (each test checks that too).
WRONG_DIFF_ID = "wrong diff id calculated on extraction"
CRI_MISSING_KEY = f"{MISSING_KEY}|{WRONG_DIFF_ID}"
CRI_WRONG_KEY = f"{WRONG_KEY}|{WRONG_DIFF_ID}"


def _decryption_failed(message: str) -> bool:
    """containerd's message names the decryption (or, in 1.6, sometimes its digest check)."""
    return "DecryptLayer" in message or WRONG_DIFF_ID in message


CTD_GZIP = "io.containerd.ocicrypt.decoder.v1.tar.gzip"
STREAM_PULLS = 200
MIN_ROTATIONS = 5


@pytest.fixture(scope="session")
def tools() -> RuntimeTools:
    try:
        return runtime_tools()
    except RuntimeToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def registry(tools: RuntimeTools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry"), tools.docker_registry) as running:
        yield running


def test_missing_runtime_tools_fail_naming_make_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the Debian 13 cache the runtime tests fail (the ``tools`` fixture) and say
    what to run; they never skip."""
    monkeypatch.setenv("KEYLEASE_TRIXIE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(RuntimeToolMissing, match="make setup") as missing:
        runtime_tools()
    for tool in ("ctd-decoder", "skopeo", "podman", "api.proto"):
        assert tool in str(missing.value)


def _short_dir(prefix: str) -> Path:
    """A directory with a short path: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture
def containerd_for(tools: RuntimeTools, registry: Registry) -> Iterator[ContainerdFactory]:
    """``start(node)``: a private containerd whose ctd-decoder reads the node's containerd key
    directory (created first, as the shipped tmpfiles.d entry does: ctd-decoder fails on a
    missing directory)."""
    started: list[Containerd] = []

    def start(node: Node) -> Containerd:
        key_dir = node.key_dirs[1]
        key_dir.mkdir(parents=True, exist_ok=True)
        containerd = Containerd(
            _short_dir("kl-ctd-"),
            binary=tools.containerd,
            ctd_decoder=tools.ctd_decoder,
            key_dir=key_dir,
            insecure_registries=[registry.host],
        )
        started.append(containerd)
        version = containerd.start()
        assert (version.runtime_name, version.runtime_api_version) == ("containerd", "v1")
        return containerd

    yield start
    for containerd in started:
        containerd.stop()
        shutil.rmtree(containerd.directory, ignore_errors=True)


def _new_key(kind: str) -> PrivateKey:
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(65537, int(kind.removeprefix("rsa-")))
    curve = {"ec-p256": ec.SECP256R1, "ec-p384": ec.SECP384R1}[kind]
    return ec.generate_private_key(curve())


@dataclass(frozen=True)
class Image:
    reference: str
    secret: bytes


class Images:
    """Unique one-layer images in the registry, encrypted to the public keys given."""

    def __init__(self, registry: Registry, directory: Path, busybox: Path | None = None) -> None:
        self.registry = registry
        self.directory = directory
        self.busybox = busybox.read_bytes() if busybox is not None else None
        self.counter = itertools.count()

    def push(self, recipients: list[Path]) -> Image:
        """A new image whose one layer holds a unique ``secret.txt`` (and busybox if given)."""
        n = next(self.counter)
        secret = f"secret {n} {secrets.token_hex(8)} {self.directory}".encode()
        files = {"secret.txt": secret}
        if self.busybox is not None:
            files["bin/busybox"] = self.busybox
        layout = self.directory / f"image-{n}"
        make_oci_image(layout, "v1", files, executable={"bin/busybox"})
        repository = re.sub("[^a-z0-9]+", "-", self.directory.name.lower()).strip("-")
        reference = self.registry.push(layout, "v1", f"{repository}/image-{n}", recipients)
        shutil.rmtree(layout)
        return Image(reference, secret)


@pytest.fixture
def images(registry: Registry, tmp_path: Path) -> Images:
    return Images(registry, tmp_path)


def _installed(node: Node, key_dir: int) -> list[Path]:
    return sorted((node.key_dirs[key_dir] / "keylease").iterdir())


@pytest.mark.parametrize("kind", ["rsa-3072", "ec-p384"])
def test_cri_pull_decrypts_with_the_agents_keys_and_fails_once_revoked(
    kind: str,
    broker: Broker,
    make_node: NodeFactory,
    containerd_for: ContainerdFactory,
    images: Images,
    tmp_path: Path,
) -> None:
    node = make_node("cri-1")
    assert node.attest().returncode == 3
    key_path = write_key(tmp_path / "image-key.pem", _new_key(kind))
    grant_node(broker, node, key_path)
    containerd = containerd_for(node)
    public = key_path.with_suffix(".pub")
    first = images.push([public])

    with containerd.cri() as cri:
        # Before the agent has installed anything, containerd cannot decrypt the layer.
        with pytest.raises(CriError, match=CRI_MISSING_KEY) as before:
            cri.pull_image(first.reference)
        assert _decryption_failed(before.value.message)
        assert cri.image_status(first.reference) is None

        ok(node.attest())
        assert [p.name for p in _installed(node, 1)] == ["prod-key.v1.pem"]
        pulled = cri.pull_image(first.reference)
        assert pulled.image_ref.startswith("sha256:")
        status = cri.image_status(first.reference)
        assert status is not None
        assert status.id == pulled.image_ref
        assert first.reference in status.repo_tags
        assert containerd.unpacked("secret.txt") == [first.secret]

        second = images.push([public])
        cri.pull_image(second.reference)
        assert sorted(containerd.unpacked("secret.txt")) == sorted([first.secret, second.secret])

        # Revoked: the agent removes the key, and the next image (a layer of its own) fails
        # with ocicrypt's own message through ctd-decoder and containerd.
        third = images.push([public])
        ok(broker.kbs("node", "revoke", node.name))
        denied = node.attest()
        assert denied.returncode == 4, denied
        assert "revoked" in denied.stderr
        assert _installed(node, 1) == []
        with pytest.raises(CriError, match=CRI_MISSING_KEY) as after:
            cri.pull_image(third.reference)
        assert _decryption_failed(after.value.message)
        assert cri.image_status(third.reference) is None
        assert third.secret not in containerd.unpacked("secret.txt")


def _holders(broker: Broker, key: str) -> list[tuple[str, list[int]]]:
    shown = broker.kbs("key", "show", key, "--json")
    ok(shown)
    return [(h["node"], h["versions"]) for h in json.loads(shown.stdout)["holders"]]


def test_an_image_encrypted_to_an_older_version_pulls_until_that_version_is_retired(
    broker: Broker,
    make_node: NodeFactory,
    containerd_for: ContainerdFactory,
    images: Images,
    tmp_path: Path,
) -> None:
    """Images live longer than a key version: after ``key rotate`` (RSA v1 -> EC v2) the node
    has both files and an image encrypted to v1 still pulls through the CRI, as does one
    encrypted to v2. ``key retire --version 1`` (refused for v2, the current version) removes
    v1's file at the next attestation: an image encrypted to v1 then fails with the runtime's
    own error (ocicrypt: none of the installed keys opens it), and one encrypted to v2 still
    pulls. Every image has a layer of its own."""
    node = make_node("versions-1")
    assert node.attest().returncode == 3
    v1 = write_key(tmp_path / "v1.pem", _new_key("rsa-2048"))
    grant_node(broker, node, v1)
    ok(node.attest())
    containerd = containerd_for(node)
    old_public = v1.with_suffix(".pub")

    with containerd.cri() as cri:
        cri.pull_image(images.push([old_public]).reference)

        v2 = write_key(tmp_path / "v2.pem", _new_key("ec-p256"))
        ok(broker.kbs("key", "rotate", "prod-key", "--private-key", str(v2)))
        ok(node.attest())
        assert [p.name for p in _installed(node, 1)] == ["prod-key.v1.pem", "prod-key.v2.pem"]
        assert _holders(broker, "prod-key") == [(node.name, [1, 2])]
        new_public = v2.with_suffix(".pub")
        older, newer = images.push([old_public]), images.push([new_public])
        cri.pull_image(older.reference)
        cri.pull_image(newer.reference)
        assert {older.secret, newer.secret} <= set(containerd.unpacked("secret.txt"))

        stale, fresh = images.push([old_public]), images.push([new_public])
        current = broker.kbs("key", "retire", "prod-key", "--version", "2")
        assert current.returncode == 2, current
        assert "rotate first" in current.stderr
        ok(broker.kbs("key", "retire", "prod-key", "--version", "1"))
        ok(node.attest())
        assert [p.name for p in _installed(node, 1)] == ["prod-key.v2.pem"]
        assert _holders(broker, "prod-key") == [(node.name, [2])]
        with pytest.raises(CriError, match=CRI_WRONG_KEY) as retired:
            cri.pull_image(stale.reference)
        assert _decryption_failed(retired.value.message)
        assert cri.image_status(stale.reference) is None
        cri.pull_image(fresh.reference)
        unpacked = containerd.unpacked("secret.txt")
        assert fresh.secret in unpacked
        assert stale.secret not in unpacked


@pytest.fixture
def two_keys(broker: Broker, make_node: NodeFactory, tmp_path: Path) -> tuple[Node, Path, Path]:
    """A node granted an RSA key (``prod-key``) and an EC key (``second``), both installed."""
    node = make_node("podman-1")
    assert node.attest().returncode == 3
    rsa_key = write_key(tmp_path / "rsa.pem", _new_key("rsa-2048"))
    grant_node(broker, node, rsa_key)
    ec_key = write_key(tmp_path / "ec.pem", _new_key("ec-p256"))
    ok(broker.kbs("key", "import", "second", "--private-key", str(ec_key)))
    ok(broker.kbs("grant", "add", "second", "--selector", "cluster=prod"))
    ok(node.attest())
    assert [p.name for p in _installed(node, 0)] == ["prod-key.v1.pem", "second.v1.pem"]
    return node, rsa_key.with_suffix(".pub"), ec_key.with_suffix(".pub")


@pytest.mark.parametrize("podman_version", ["4.3 with buildah 1.28", "5.4"])
def test_podman_runs_an_image_decrypted_with_the_installed_key_files(
    podman_version: str,
    tools: RuntimeTools,
    registry: Registry,
    two_keys: tuple[Node, Path, Path],
    broker: Broker,
    tmp_path: Path,
) -> None:
    """Every file in the key directory, one ``--decryption-key`` each (a directory is refused),
    decrypts the image encrypted to it; ``podman run`` prints the layer's secret."""
    node, rsa_public, ec_public = two_keys
    images = Images(registry, tmp_path, busybox=tools.busybox)
    directory = _short_dir("kl-podman-")
    try:
        if podman_version == "5.4":
            podman = Podman(
                directory,
                podman=tools.podman_trixie,
                runc=tools.runc,
                conmon=tools.conmon,
                helpers=tools.trixie_helpers,
            )
            pull = podman.pull
        else:
            podman = Podman(
                directory,
                podman=tools.podman,
                runc=tools.runc,
                conmon=tools.conmon,
                buildah=tools.buildah,
            )
            pull = podman.buildah_pull
        assert podman.version().startswith(f"podman version {podman_version.split()[0]}.")
        keys = _installed(node, 0)
        for public in (rsa_public, ec_public):
            image = images.push([public])
            image_id = pull(image.reference, keys)
            assert re.fullmatch("[0-9a-f]{64}", image_id), image_id
            out = podman.run(image.reference, "/bin/busybox", "cat", "/secret.txt")
            assert out.encode() == image.secret

        # Without the key that opens it, the runtime refuses with ocicrypt's message.
        image = images.push([rsa_public])
        only_ec = [k for k in keys if k.name == "second.v1.pem"]
        with pytest.raises(ContainerToolError, match=WRONG_KEY):
            pull(image.reference, only_ec)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_skopeo_1_18_decrypts_with_the_installed_key_files(
    tools: RuntimeTools, two_keys: tuple[Node, Path, Path], images: Images, tmp_path: Path
) -> None:
    node, rsa_public, ec_public = two_keys
    keys = _installed(node, 0)
    for n, public in enumerate((rsa_public, ec_public)):
        image = images.push([public])
        out = tmp_path / f"fetched-{n}"
        skopeo_fetch(image.reference, out, "v1", keys, binary=tools.skopeo_trixie)
        assert read_file_from_image(out, "v1", "secret.txt") == image.secret
    image = images.push([ec_public])
    with pytest.raises(RuntimeError, match=WRONG_KEY):
        skopeo_fetch(
            image.reference,
            tmp_path / "wrong",
            "v1",
            [k for k in keys if k.name == "prod-key.v1.pem"],
            binary=tools.skopeo_trixie,
        )


@dataclass(frozen=True)
class Pull:
    started: float
    ended: float
    error: str  # "" when the pull succeeded
    recipient: str  # the key version the image was encrypted to, e.g. "rotating v3"
    newest: str  # the newest version of the rotating key published when it was pushed


Recipient = tuple[str, Path]  # (label, public key file)


class PullStream:
    """A thread pushing unique images and pulling each through the CRI, one after the other,
    until told to stop. Each image is encrypted to one key version: odd ones to ``steady``,
    even ones in turn to ``first`` and each version ``publish``ed, until ``withdraw``n (an operator
    encrypts new images to a version once nodes have it, and retires a version once no image
    needs it), so every installed file must decrypt on its own."""

    def __init__(
        self, containerd: Containerd, images: Images, steady: Recipient, first: Recipient
    ) -> None:
        self.containerd = containerd
        self.images = images
        self.steady = steady
        self.pulls: list[Pull] = []
        self.secrets: list[bytes] = []
        self.crash: BaseException | None = None
        self._active: list[Recipient] = [first]
        self._generation = 0  # changes to _active so far
        self._pulled_generation = 0  # the generation the last finished pull was pushed with
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._guarded, daemon=True)

    def publish(self, recipient: Recipient) -> None:
        """Encrypt images to ``recipient`` from now on, beside the other active versions."""
        self._change(lambda active: active.append(recipient))

    def withdraw(self, recipient: Recipient) -> None:
        """Stop encrypting images to ``recipient``; return once no image in flight uses it."""
        self._change(lambda active: active.remove(recipient))

    def _change(self, edit: Callable[[list[Recipient]], None]) -> None:
        """Apply ``edit``; return once a pull of an image pushed after it has finished (pulls
        run one at a time, so no earlier image is still in flight)."""
        with self._cond:
            edit(self._active)
            self._generation += 1
            generation = self._generation
            if not self._cond.wait_for(
                lambda: self._pulled_generation >= generation or self.crash is not None, 120
            ):
                raise TimeoutError("no pull finished within 120 s")

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by __exit__ in the test's thread
            with self._cond:
                self.crash = exc
                self._cond.notify_all()

    def _run(self) -> None:
        with self.containerd.cri() as cri:
            for n in itertools.count():
                if self._stop.is_set():
                    return
                with self._cond:
                    active, generation = list(self._active), self._generation
                label, public = self.steady if n % 2 else active[(n // 2) % len(active)]
                image = self.images.push([public])
                started = time.monotonic()
                try:
                    cri.pull_image(image.reference)
                    error = ""
                    self.secrets.append(image.secret)
                except CriError as exc:
                    error = exc.message
                with self._cond:
                    self.pulls.append(Pull(started, time.monotonic(), error, label, active[-1][0]))
                    self._pulled_generation = generation
                    self._cond.notify_all()

    def __enter__(self) -> PullStream:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=300)
        assert not self._thread.is_alive(), "the pull stream did not finish"
        if self.crash is not None and exc_type is None:
            raise RuntimeError("the pull stream crashed") from self.crash


def test_every_key_file_stays_loadable_under_a_stream_of_cri_pulls(
    broker: Broker,
    make_node: NodeFactory,
    containerd_for: ContainerdFactory,
    images: Images,
    tmp_path: Path,
) -> None:
    """≥ 200 CRI pulls while the agent installs, rotates, retires and removes keys, all the
    while: a steady RSA key, a rotated EC key (each rotation adds a file beside the previous
    version, images are then encrypted to either, and retiring the previous version removes
    its file once no image needs it) and keys granted and removed around them. ctd-decoder
    loads every file in the directory for every encrypted layer: one unparseable, partial or
    temporary file fails the pull. None may fail."""
    node = make_node("stream-1")
    assert node.attest().returncode == 3
    steady = write_key(tmp_path / "steady.pem", _new_key("rsa-2048"))
    grant_node(broker, node, steady, key_name="steady")
    first = write_key(tmp_path / "rotating-v1.pem", _new_key("ec-p256"))
    ok(broker.kbs("key", "import", "rotating", "--private-key", str(first)))
    ok(broker.kbs("grant", "add", "rotating", "--selector", "cluster=prod"))
    ok(node.attest())
    assert [p.name for p in _installed(node, 1)] == ["rotating.v1.pem", "steady.v1.pem"]
    containerd = containerd_for(node)
    attests: list[tuple[float, float]] = []

    def attest() -> None:
        started = time.monotonic()
        ok(node.attest())
        attests.append((started, time.monotonic()))

    def rotating(version: int) -> Recipient:
        return f"rotating v{version}", tmp_path / f"rotating-v{version}.pub"

    started = time.monotonic()
    version = 1
    with PullStream(
        containerd, images, ("steady", steady.with_suffix(".pub")), rotating(1)
    ) as stream:
        while len(stream.pulls) < STREAM_PULLS or version <= MIN_ROTATIONS:
            version += 1
            rotated = write_key(tmp_path / f"rotating-v{version}.pem", _new_key("ec-p256"))
            ok(broker.kbs("key", "rotate", "rotating", "--private-key", str(rotated)))
            attest()  # adds rotating.v<N>.pem beside rotating.v<N-1>.pem
            assert node.key_file("rotating", 1, version=version).read_bytes() == (
                rotated.read_bytes()
            )
            assert node.key_file("rotating", 1, version=version - 1).exists()
            stream.publish(rotating(version))
            churn = f"churn-{version}"
            churn_key = _new_key(["rsa-2048", "ec-p384"][version % 2])
            churn_path = write_key(tmp_path / f"{churn}.pem", churn_key)
            ok(broker.kbs("key", "import", churn, "--private-key", str(churn_path)))
            ok(broker.kbs("grant", "add", churn, "--selector", "region=eu"))
            attest()
            assert node.key_file(churn, 1).exists()
            if version % 2:
                ok(broker.kbs("key", "delete", churn))
            else:
                ok(broker.kbs("grant", "remove", churn, "--selector", "region=eu"))
            attest()
            assert not node.key_file(churn, 1).exists()
            stream.withdraw(rotating(version - 1))
            ok(broker.kbs("key", "retire", "rotating", "--version", str(version - 1)))
            attest()  # removes rotating.v<N-1>.pem
            assert not node.key_file("rotating", 1, version=version - 1).exists()
    elapsed = time.monotonic() - started

    failed = [p.error for p in stream.pulls if p.error]
    assert not failed, f"{len(failed)} of {len(stream.pulls)} pulls failed; first: {failed[0]}"
    assert len(stream.pulls) >= STREAM_PULLS
    during_installs = [
        p
        for p in stream.pulls
        if any(p.started < end and p.ended > start for start, end in attests)
    ]
    assert len(during_installs) >= len(attests), (len(during_installs), len(attests))
    older = [p for p in stream.pulls if p.recipient not in ("steady", p.newest)]
    assert len(older) >= MIN_ROTATIONS, "too few pulls of images encrypted to an older version"
    assert [p.name for p in _installed(node, 1)] == [f"rotating.v{version}.pem", "steady.v1.pem"]
    unpacked = containerd.unpacked("secret.txt")
    assert len(unpacked) == len(stream.pulls)
    assert sorted(unpacked) == sorted(stream.secrets)
    print(
        f"\n{len(stream.pulls)} CRI pulls in {elapsed:.1f} s, {len(during_installs)} of them "
        f"during one of {len(attests)} agent installs ({version - 1} rotations, as many "
        f"retirements; {len(older)} pulls of images encrypted to the older of two installed "
        "versions); none failed"
    )


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_toml(heading: str) -> dict[str, Any]:
    """The first ```toml block under ``heading`` in the README, parsed."""
    text = README.read_text()
    section = text[text.index(f"\n{heading}\n") :]
    block = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert block is not None, heading
    return tomllib.loads(block.group(1))


def test_the_readmes_runtime_configs_are_the_ones_tested(tmp_path: Path) -> None:
    """The README's containerd config.toml is what ``harness.containerd`` runs (the tables that
    decrypt; the harness adds only private paths), for the agent's default key directory; its
    crio.conf names the agent's other default key directory."""
    documented = _readme_toml("### containerd (Kubernetes through the CRI)")
    key_dir = Path(DEFAULT_KEY_DIRS[1])
    decoder = Path(documented["stream_processors"][CTD_GZIP]["path"])
    tested = tomllib.loads(containerd_config(tmp_path, decoder, key_dir))
    cri = "io.containerd.grpc.v1.cri"
    assert documented["version"] == tested["version"] == 2
    assert documented["plugins"][cri]["image_decryption"] == {"key_model": "node"}
    assert tested["plugins"][cri]["image_decryption"] == {"key_model": "node"}
    assert documented["stream_processors"] == tested["stream_processors"]
    assert documented["stream_processors"][CTD_GZIP]["args"] == [
        "--decryption-keys-path", str(key_dir)
    ]  # fmt: skip
    crio = _readme_toml("### CRI-O")
    assert crio == {"crio": {"runtime": {"decryption_keys_path": DEFAULT_KEY_DIRS[0] + "/"}}}


_FIELD = re.compile(r"^\s*(repeated\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*[;\[]", re.MULTILINE)
_RPC = re.compile(r"rpc\s+(\w+)\s*\(\s*(\w+)\s*\)\s*returns\s*\(\s*(\w+)\s*\)")
_SCALARS = {FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_UINT64: "uint64"}


def _upstream_blocks(text: str, kind: str) -> dict[str, str]:
    """``message NAME { ... }`` / ``service NAME { ... }`` bodies of a proto file (top level,
    no nested braces in the parts compared here)."""
    return {
        m.group(1): m.group(2)
        for m in re.finditer(rf"^{kind}\s+(\w+)\s*\{{(.*?)^\}}", text, re.MULTILINE | re.DOTALL)
    }


def test_the_cri_subset_matches_the_upstream_api_proto(tools: RuntimeTools) -> None:
    """harness/cri/api.proto keeps upstream's package, service, rpc, message and field names,
    numbers and types (Debian 13's golang-github-kubernetes-cri-api-dev)."""
    upstream = tools.cri_api_proto.read_text()
    assert re.search(r"^package runtime\.v1;", upstream, re.MULTILINE)
    ours = api_pb2.DESCRIPTOR
    assert ours.package == "runtime.v1"
    messages = _upstream_blocks(upstream, "message")
    for name, message in ours.message_types_by_name.items():
        fields = {
            m.group(3): (bool(m.group(1)), m.group(2), int(m.group(4)))
            for m in _FIELD.finditer(messages[name])
        }
        for field in message.fields:
            kind = field.message_type.name if field.message_type else _SCALARS[field.type]
            expected = (field.is_repeated, kind, field.number)
            assert fields[field.name] == expected, (name, field.name)
    services = _upstream_blocks(upstream, "service")
    for name, service in ours.services_by_name.items():
        rpcs = {m.group(1): (m.group(2), m.group(3)) for m in _RPC.finditer(services[name])}
        for method in service.methods:
            assert rpcs[method.name] == (method.input_type.name, method.output_type.name)

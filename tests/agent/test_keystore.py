"""The key installer against real files: atomic publish under a concurrent reader, refusals of
symlinks and foreign entries, modes, crash leftovers; and the ocicrypt key checks."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.errors import InvalidKey, KeystoreError
from agent.keystore import InstallableKey, KeyDirectory, SyncResult, parse_key_file
from agent.keystore.ocikey import validate_private_key_pem
from keylease.secret import Secret

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ec_pem(curve: ec.EllipticCurve | None = None) -> bytes:
    return pkcs8(ec.generate_private_key(curve or ec.SECP256R1()))


def key(name: str, pem: bytes, version: int = 1) -> InstallableKey:
    return InstallableKey(name=name, version=version, pem=Secret(pem))


def f(name: str, version: int = 1) -> str:
    """The file of one key version."""
    return f"{name}.v{version}.pem"


@pytest.fixture(scope="module")
def rsa2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def pool(rsa2048: rsa.RSAPrivateKey) -> list[bytes]:
    """Distinct valid keys to rotate through (EC parses fast; one RSA for variety)."""
    curves = [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()]
    return [pkcs8(rsa2048)] + [ec_pem(curves[i % 3]) for i in range(9)]


@pytest.fixture
def tmpfs_dir() -> Iterator[Path]:
    """A directory on a tmpfs, where the agent puts key directories in production."""
    if not Path("/dev/shm").is_dir():
        pytest.fail("/dev/shm (tmpfs) is missing")
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="keylease-test-") as path:
        yield Path(path)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- atomicity under a concurrent reader --------------------------------------------------------


@dataclass
class ReaderStats:
    walks: int = 0
    reads: int = 0
    vanished: int = 0
    bad: list[str] = field(default_factory=list)


def read_like_a_runtime(root: Path, stop: threading.Event, stats: ReaderStats) -> None:
    """Walk the key directory the way CRI-O/ctd-decoder do and parse every file found."""
    while not stop.is_set():
        stats.walks += 1
        for dirpath, dirnames, filenames in os.walk(root):
            for entry in dirnames + filenames:
                path = os.path.join(dirpath, entry)
                try:
                    mode = os.lstat(path).st_mode
                    if stat.S_ISLNK(mode):
                        stats.bad.append(f"symlink {path}")
                    elif stat.S_ISREG(mode):
                        with open(path, "rb") as f:
                            data = f.read()
                        serialization.load_pem_private_key(data, password=None)
                        stats.reads += 1
                    elif not stat.S_ISDIR(mode):
                        stats.bad.append(f"special file {path}")
                except FileNotFoundError:
                    stats.vanished += 1  # removed between listing and open: a runtime retries
                except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                    stats.bad.append(f"unparseable {path}: {type(exc).__name__}")


@pytest.mark.parametrize("where", ["disk", "tmpfs", "no-o_tmpfile"])
def test_concurrent_reader_never_sees_a_partial_or_foreign_file(
    where: str, tmp_path: Path, tmpfs_dir: Path, pool: list[bytes]
) -> None:
    base = tmpfs_dir if where == "tmpfs" else tmp_path
    kd = KeyDirectory(base / "crio" / "keys", o_tmpfile=where != "no-o_tmpfile")
    kd.sync([])  # the directory exists before the runtime starts walking it
    stats = ReaderStats()
    stop = threading.Event()
    reader = threading.Thread(target=read_like_a_runtime, args=(kd.root, stop, stats))
    previous_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # interleave the two threads as finely as possible
    reader.start()
    try:
        trio = ["alpha", "beta", "gamma"]

        def pem(n: int, version: int) -> bytes:
            return pool[(version + n) % len(pool)]

        first = kd.sync([key(n, pem(i, 1)) for i, n in enumerate(trio)])
        assert first.installed == tuple(f(n) for n in trio)

        # Each rotation installs version r beside r-1 and drops r-2 (retired); every 10th
        # revokes gamma (every version), the next brings it back.
        for r in range(2, 63):
            wanted = trio if r % 10 else trio[:2]
            keys = [key(name, pem(i, v), v) for i, name in enumerate(wanted) for v in (r - 1, r)]
            before = set(names(kd.directory))
            result = kd.sync(keys)
            files = [k.file_name for k in keys]
            assert result.installed == tuple(file for file in files if file not in before)
            assert result.unchanged == tuple(file for file in files if file in before)
            assert result.removed == tuple(sorted(before - set(files)))
            assert len(result.removed) == ({0: 4, 1: 2}.get(r % 10, 3) if r > 2 else 0)
            assert names(kd.directory) == sorted(files)
        assert kd.clear() == sorted(f(n, v) for n in trio for v in (61, 62))
        assert names(kd.directory) == []
        while stats.reads < 200 and reader.is_alive():  # the reader also sees the final state
            kd.sync([key("alpha", pool[1])])
            kd.sync([key("alpha", pool[2])])
        kd.clear()
    finally:
        stop.set()
        reader.join(timeout=30)
        sys.setswitchinterval(previous_interval)
    assert not reader.is_alive()
    assert stats.bad == []
    assert stats.reads >= 200, stats
    assert names(kd.root) == ["keylease"]
    assert names(kd.root.parent) == ["keys"]  # no staging directory left behind


# -- what the installer owns and refuses --------------------------------------------------------


def test_installs_pkcs8_files_0600_in_a_0700_subdirectory_of_a_0755_root(
    tmp_path: Path, pool: list[bytes]
) -> None:
    root = tmp_path / "etc" / "containerd" / "ocicrypt" / "keys"  # parents missing too
    old_umask = os.umask(0o077)
    try:
        result = KeyDirectory(root).sync([key("prod", pool[0]), key("edge", pool[1])])
    finally:
        os.umask(old_umask)
    assert result == SyncResult(installed=(f("prod"), f("edge")), unchanged=(), removed=())
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "keylease").stat().st_mode) == 0o700
    assert names(root) == ["keylease"]
    assert names(root / "keylease") == ["edge.v1.pem", "prod.v1.pem"]
    for name, pem in (("prod", pool[0]), ("edge", pool[1])):
        path = root / "keylease" / f(name)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert path.read_bytes() == pem
    assert KeyDirectory(root).installed() == ["edge.v1.pem", "prod.v1.pem"]


def test_unchanged_keys_are_not_rewritten_and_changed_ones_are(
    tmp_path: Path, pool: list[bytes]
) -> None:
    kd = KeyDirectory(tmp_path / "keys")
    kd.sync([key("a", pool[0]), key("b", pool[1])])
    before = {n: (kd.directory / f(n)).stat() for n in ("a", "b")}
    result = kd.sync([key("a", pool[0]), key("b", pool[2])])  # b v1 changed (not in practice)
    assert result == SyncResult(installed=(f("b"),), unchanged=(f("a"),), removed=())
    after_a = (kd.directory / f("a")).stat()
    assert (after_a.st_ino, after_a.st_mtime_ns) == (before["a"].st_ino, before["a"].st_mtime_ns)
    assert (kd.directory / f("b")).stat().st_ino != before["b"].st_ino
    assert (kd.directory / f("b")).read_bytes() == pool[2]
    # A file whose mode drifted is rewritten with 0600.
    os.chmod(kd.directory / f("a"), 0o644)
    assert kd.sync([key("a", pool[0]), key("b", pool[2])]).installed == (f("a"),)
    assert stat.S_IMODE((kd.directory / f("a")).stat().st_mode) == 0o600


def test_keys_no_longer_granted_are_removed_after_new_ones_are_installed(
    tmp_path: Path, pool: list[bytes]
) -> None:
    kd = KeyDirectory(tmp_path / "keys")
    kd.sync([key("old", pool[0]), key("kept", pool[1])])
    result = kd.sync([key("kept", pool[1]), key("new", pool[2])])
    assert result == SyncResult(installed=(f("new"),), unchanged=(f("kept"),), removed=(f("old"),))
    assert names(kd.directory) == ["kept.v1.pem", "new.v1.pem"]
    assert kd.sync([]).removed == (f("kept"), f("new"))
    assert names(kd.directory) == []


def test_each_key_version_has_a_file_of_its_own(tmp_path: Path, pool: list[bytes]) -> None:
    """A rotation adds a file beside the older versions; a retirement removes exactly one; a
    key whose name looks like a version suffix keeps a file name of its own."""
    kd = KeyDirectory(tmp_path / "keys")
    kd.sync([key("prod", pool[0], 1)])
    rotated = kd.sync([key("prod", pool[0], 1), key("prod", pool[1], 2)])
    assert rotated == SyncResult(installed=(f("prod", 2),), unchanged=(f("prod", 1),), removed=())
    assert (kd.directory / f("prod", 1)).read_bytes() == pool[0]
    assert (kd.directory / f("prod", 2)).read_bytes() == pool[1]
    tricky = [key("prod.v1", pool[2], 3), key("prod.v2", pool[3], 1), key("prod", pool[1], 2)]
    retired = kd.sync(tricky)  # version 1 of prod retired; two keys named like versions
    assert retired.removed == (f("prod", 1),)
    assert names(kd.directory) == ["prod.v1.v3.pem", "prod.v2.pem", "prod.v2.v1.pem"]
    assert (kd.directory / "prod.v2.pem").read_bytes() == pool[1]  # prod v2, not key prod.v2
    assert (kd.directory / "prod.v2.v1.pem").read_bytes() == pool[3]
    assert parse_key_file("prod.v1.v3.pem") == ("prod.v1", 3)
    assert parse_key_file("prod.v2.v1.pem") == ("prod.v2", 1)
    assert parse_key_file("prod.pem") == ("prod", None)
    assert parse_key_file(".prod.v1.pem.0123") is None


def test_files_of_agents_from_before_key_versions_are_replaced(
    tmp_path: Path, pool: list[bytes]
) -> None:
    """``<name>.pem`` (one file per key, as earlier agents wrote it) is the agent's own: a sync
    installs ``<name>.v<N>.pem`` and then removes it."""
    kd = KeyDirectory(tmp_path / "keys")
    kd.sync([])
    legacy = kd.directory / "prod.pem"
    legacy.write_bytes(pool[0])
    legacy.chmod(0o600)
    assert kd.installed() == ["prod.pem"]
    result = kd.sync([key("prod", pool[0], 4)])
    assert result == SyncResult(installed=(f("prod", 4),), unchanged=(), removed=("prod.pem",))
    assert names(kd.directory) == ["prod.v4.pem"]


def test_foreign_files_in_the_root_are_never_touched(tmp_path: Path, pool: list[bytes]) -> None:
    root = tmp_path / "keys"
    (root / "team").mkdir(parents=True)
    foreign = {
        root / "operator-key.pem": b"not ours",
        root / ".hidden.pem.1234": b"not ours either",
        root / "team" / "x.pem": b"nor this",
    }
    for path, content in foreign.items():
        path.write_bytes(content)
    stamps = {path: path.stat().st_mtime_ns for path in foreign}
    kd = KeyDirectory(root)
    kd.sync([key("a", pool[0])])
    kd.sync([key("a", pool[1])])
    assert kd.clear() == [f("a")]
    for path, content in foreign.items():
        assert path.read_bytes() == content
        assert path.stat().st_mtime_ns == stamps[path]
    assert names(root) == [".hidden.pem.1234", "keylease", "operator-key.pem", "team"]


def test_symlinked_root_is_refused_and_nothing_is_written_through_it(
    tmp_path: Path, pool: list[bytes]
) -> None:
    target = tmp_path / "real"
    target.mkdir()
    root = tmp_path / "keys"
    root.symlink_to(target)
    kd = KeyDirectory(root)
    for operation in (lambda: kd.sync([key("a", pool[0])]), kd.clear, kd.installed):
        with pytest.raises(KeystoreError) as refused:
            operation()
        assert str(root) in str(refused.value)
        assert "symlink" in str(refused.value)
        assert "replace it with a real directory" in str(refused.value)
    assert names(target) == []
    assert names(tmp_path) == ["keys", "real"]  # no staging directory either

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(KeystoreError, match="symlink"):
        KeyDirectory(dangling).sync([key("a", pool[0])])
    assert not (tmp_path / "nowhere").exists()


def test_symlinked_keylease_directory_is_refused(tmp_path: Path, pool: list[bytes]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.pem").write_bytes(pool[0])
    root = tmp_path / "keys"
    root.mkdir()
    (root / "keylease").symlink_to(elsewhere)
    kd = KeyDirectory(root)
    for operation in (lambda: kd.sync([key("b", pool[1])]), kd.clear, kd.installed):
        with pytest.raises(KeystoreError) as refused:
            operation()
        assert f"{root / 'keylease'} is a symlink" in str(refused.value)
    assert names(elsewhere) == ["a.pem"]
    assert (elsewhere / "a.pem").read_bytes() == pool[0]


@pytest.mark.parametrize("which", ["root", "keylease"])
def test_a_file_where_a_directory_belongs_is_refused(
    which: str, tmp_path: Path, pool: list[bytes]
) -> None:
    root = tmp_path / "keys"
    if which == "keylease":
        root.mkdir()
    path = root / "keylease" if which == "keylease" else root
    path.write_bytes(b"a file")
    with pytest.raises(KeystoreError, match="not a directory") as refused:
        KeyDirectory(root).sync([key("a", pool[0])])
    assert str(path) in str(refused.value)
    assert path.read_bytes() == b"a file"


@pytest.mark.parametrize("kind", ["subdirectory", "symlink", "unknown file"])
def test_entries_the_agent_did_not_write_in_its_directory_are_refused(
    kind: str, tmp_path: Path, pool: list[bytes]
) -> None:
    kd = KeyDirectory(tmp_path / "keys")
    kd.sync([key("a", pool[0])])
    entry = kd.directory / "intruder"
    if kind == "subdirectory":
        entry.mkdir()
    elif kind == "symlink":
        entry.symlink_to(tmp_path / "target.pem")
    else:
        entry.write_bytes(b"README")
    with pytest.raises(KeystoreError) as refused:
        kd.sync([key("a", pool[1]), key("b", pool[2])])
    assert "intruder" in str(refused.value)
    assert "move it out" in str(refused.value)
    assert (kd.directory / f("a")).read_bytes() == pool[0]  # nothing changed
    assert not (kd.directory / f("b")).exists()
    assert not (tmp_path / "target.pem").exists()
    # Clearing (on a denial) still removes every key the agent owns, and nothing else.
    assert kd.clear() == [f("a")]
    assert names(kd.directory) == ["intruder"]


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_leftovers_of_a_crash_are_cleaned_up(
    o_tmpfile: bool, tmp_path: Path, pool: list[bytes]
) -> None:
    kd = KeyDirectory(tmp_path / "keys", o_tmpfile=o_tmpfile)
    kd.sync([key("a", pool[0])])
    (kd.directory / ".a.v1.pem.0123456789abcdef").write_bytes(pool[1])
    (kd.directory / ".b.pem.fedcba9876543210").write_bytes(pool[1][:100])  # an older agent's
    (kd.directory / f".{'x' * 63}.v4294967295.pem.fedcba9876543210").write_bytes(b"")
    staging = tmp_path / ".keylease-staging-keys"
    staging.mkdir()
    (staging / ".c.v2.pem.00112233445566aa").write_bytes(pool[2][:50])
    assert kd.sync([key("a", pool[0])]) == SyncResult((), (f("a"),), ())
    assert names(kd.directory) == [f("a")]
    assert names(tmp_path) == ["keys"]

    (kd.directory / ".a.v1.pem.0123456789abcdef").write_bytes(pool[1])
    staging.mkdir()
    (staging / ".a.v1.pem.00112233445566aa").write_bytes(pool[2][:50])
    assert kd.clear() == [f("a")]
    assert names(kd.directory) == []
    assert names(tmp_path) == ["keys"]


def test_invalid_or_duplicate_keys_are_refused_before_anything_is_written(
    tmp_path: Path, pool: list[bytes]
) -> None:
    kd = KeyDirectory(tmp_path / "keys")
    kd.sync([key("a", pool[0])])
    sec1 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with pytest.raises(InvalidKey, match="'bad'"):
        kd.sync([key("b", pool[1]), key("bad", sec1)])
    with pytest.raises(InvalidKey, match="names b v2 twice"):
        kd.sync([key("b", pool[1], 2), key("b", pool[2], 2)])
    with pytest.raises(InvalidKey, match="versions start at 1"):
        kd.sync([key("b", pool[1], 0)])
    with pytest.raises(InvalidKey, match="not allowed"):
        kd.sync([key("../escape", pool[1])])
    assert names(kd.directory) == [f("a")]
    assert not (tmp_path / "escape.pem").exists()


def test_clear_and_installed_on_a_missing_directory_create_nothing(tmp_path: Path) -> None:
    kd = KeyDirectory(tmp_path / "absent" / "keys")
    assert kd.clear() == []
    assert kd.installed() == []
    assert names(tmp_path) == []
    (tmp_path / "keys").mkdir()
    assert KeyDirectory(tmp_path / "keys").clear() == []
    assert names(tmp_path / "keys") == []


def test_os_errors_become_keystore_errors_naming_the_path(
    tmp_path: Path, pool: list[bytes]
) -> None:
    (tmp_path / "file").write_bytes(b"")
    root = tmp_path / "file" / "keys"
    with pytest.raises(KeystoreError) as refused:
        KeyDirectory(root).sync([key("a", pool[0])])
    assert str(root) in str(refused.value)
    assert "Not a directory" in str(refused.value)


# -- ocikey: the checks ocicrypt's parser implies ------------------------------------------------


def encrypted_pkcs8() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )


def traditional(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


BAD_KEYS: dict[str, Callable[[], bytes]] = {
    "SEC1 EC PRIVATE KEY": lambda: traditional(ec.generate_private_key(ec.SECP256R1())),
    "PKCS#1 RSA PRIVATE KEY": lambda: traditional(rsa.generate_private_key(65537, 2048)),
    "PKCS#1 body under a PKCS#8 header": lambda: traditional(
        rsa.generate_private_key(65537, 2048)
    ).replace(b"RSA PRIVATE KEY", b"PRIVATE KEY"),
    "encrypted PKCS#8": encrypted_pkcs8,
    "RSA-1024": lambda: pkcs8(rsa.generate_private_key(65537, 1024)),  # noqa: S505
    "Ed25519": lambda: pkcs8(ed25519.Ed25519PrivateKey.generate()),
    "secp256k1": lambda: ec_pem(ec.SECP256K1()),
    "two PEM blocks": lambda: ec_pem() + ec_pem(),
    "garbage": lambda: b"this is not a key\n",
    "empty": lambda: b"",
    "text before the block": lambda: b"key:\n" + ec_pem(),
    "text after the block": lambda: ec_pem() + b"# comment\n",
    "BEGIN not at a line start": lambda: b"  " + ec_pem(),
    "PEM headers": lambda: ec_pem().replace(b"-----\n", b"-----\nComment: x\n\n", 1),
    "truncated": lambda: ec_pem()[:-60] + b"\n-----END PRIVATE KEY-----\n",
    "public key": lambda: (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_KEYS))
def test_keys_ocicrypt_would_not_accept_are_refused(kind: str) -> None:
    pem = BAD_KEYS[kind]()
    with pytest.raises(InvalidKey) as refused:
        validate_private_key_pem("image-key", Secret(pem))
    message = str(refused.value)
    assert "'image-key'" in message
    for line in pem.splitlines():
        if len(line) > 16 and not line.startswith(b"-----"):
            assert line.decode(errors="replace") not in message


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "..", ".hidden", "-x", "a" * 64, "a\n"])
def test_names_unsafe_as_file_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidKey, match="not allowed"):
        validate_private_key_pem(name, Secret(ec_pem()))


@pytest.mark.parametrize(
    "kind",
    ["RSA-2048", "RSA-3072", "P-256", "P-384", "P-521", "CRLF and blank lines around"],
)
def test_pkcs8_rsa_and_nist_ec_keys_are_accepted(kind: str, rsa2048: rsa.RSAPrivateKey) -> None:
    pem = {
        "RSA-2048": lambda: pkcs8(rsa2048),
        "RSA-3072": lambda: pkcs8(rsa.generate_private_key(65537, 3072)),
        "P-256": lambda: ec_pem(ec.SECP256R1()),
        "P-384": lambda: ec_pem(ec.SECP384R1()),
        "P-521": lambda: ec_pem(ec.SECP521R1()),
        "CRLF and blank lines around": lambda: b"\n\n" + ec_pem().replace(b"\n", b"\r\n") + b"\n ",
    }[kind]()
    validate_private_key_pem("prod-eu.v2_key", Secret(pem))
    validate_private_key_pem("a" * 63, Secret(pem))

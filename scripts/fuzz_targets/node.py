"""The agent's side: the decrypted key bundle and the sealed cache (issue 12 changes key
versions: re-point ``fuzz_release_bundle`` if the bundle's parser moves)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.keystore.cache import RELEASE, RELEASE_PCRS, SealedCache
from agent.release import parse_bundle
from agent.state import StateDir
from keylease.api.v1 import keylease_pb2 as pb
from scripts.fuzz_targets.common import NODE, NOW, ec_key, work

# --- the agent's side: key bundles and the sealed cache (issue 12 changes key versions) --------


def fuzz_release_bundle(data: bytes) -> None:
    parse_bundle(data, NODE)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def bundle_seeds() -> Iterator[bytes]:
    issued = int(NOW.timestamp())
    keys = [pb.BundledKey(name="prod-eu", version=3, private_key_pem=_pkcs8(ec_key(20)))]
    yield pb.KeyBundle(node_name=NODE, issued_at_unix=issued, not_after_unix=issued + 3600,
                       keys=keys).SerializeToString()  # fmt: skip
    keys.append(pb.BundledKey(name="legacy", version=1,
                              private_key_pem=_pkcs8(ec_key(21, ec.SECP384R1()))))  # fmt: skip
    yield pb.KeyBundle(node_name=NODE, issued_at_unix=issued, not_after_unix=issued + 60,
                       keys=keys).SerializeToString()  # fmt: skip


@cache
def _state() -> SealedCache:
    return SealedCache(StateDir.open(work() / "state"))


def fuzz_release_cache(data: bytes) -> None:
    """Input: the length of ``release.bin`` (2 bytes), ``release.bin``, ``release-pcrs.json``."""
    cache = _state()
    size = int.from_bytes(data[:2], "big")
    directory = work() / "state"
    (directory / RELEASE).write_bytes(data[2 : 2 + size])
    (directory / RELEASE_PCRS).write_bytes(data[2 + size :])
    cache.load()
    cache.changed_pcrs(lambda bank, indices: {i: bytes(32) for i in indices})


def cache_seeds() -> Iterator[bytes]:
    release = pb.Release(
        node_name=NODE, duplicate=b"d" * 100, in_sym_seed=b"s" * 256, sealed_public=b"p" * 80,
        pcr_bank="sha256", pcr_indices=[0, 7], bundle_nonce=b"n" * 12, bundle_ciphertext=b"c" * 300,
    ).SerializeToString()  # fmt: skip
    pcrs = b'{"bank": "sha256", "pcrs": {"0": "' + b"00" * 32 + b'", "7": "' + b"11" * 32 + b'"}}'
    yield len(release).to_bytes(2, "big") + release + pcrs

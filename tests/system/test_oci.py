"""Real images through real skopeo (ocicrypt JWE): what the agent installs is what decrypts."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.keystore import InstallableKey, KeyDirectory
from harness.oci import (
    make_oci_image,
    read_file_from_image,
    skopeo_decrypt,
    skopeo_encrypt,
)
from keylease.secret import Secret

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
WRONG_KEY = "none of the private keys could be used for decryption"


def write_pair(directory: Path, name: str, key: PrivateKey) -> tuple[Path, Path]:
    private = directory / f"{name}.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = directory / f"{name}.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def new_key(kind: str) -> PrivateKey:
    if kind == "rsa-2048":
        return rsa.generate_private_key(65537, 2048)
    return ec.generate_private_key({"p-256": ec.SECP256R1, "p-384": ec.SECP384R1}[kind]())


@pytest.fixture
def plain_image(tmp_path: Path) -> tuple[Path, bytes]:
    """A one-layer image whose layer is unique to this test (runtimes dedup plaintext layers)."""
    secret = b"layer secret for " + str(tmp_path).encode()
    make_oci_image(tmp_path / "plain", "v1", {"secret.txt": secret, "etc/motd": b"hello\n"})
    return tmp_path / "plain", secret


def test_image_layout_is_reproducible_and_readable(tmp_path: Path) -> None:
    files = {"b.txt": b"b", "dir/a.txt": b"a"}
    make_oci_image(tmp_path / "one", "v1", files)
    make_oci_image(tmp_path / "two", "v1", dict(reversed(list(files.items()))))
    assert (tmp_path / "one" / "index.json").read_bytes() == (
        tmp_path / "two" / "index.json"
    ).read_bytes()
    assert read_file_from_image(tmp_path / "one", "v1", "dir/a.txt") == b"a"
    with pytest.raises(LookupError):
        read_file_from_image(tmp_path / "one", "v1", "missing.txt")
    with pytest.raises(LookupError):
        read_file_from_image(tmp_path / "one", "v2", "b.txt")


@pytest.mark.parametrize("kind", ["rsa-2048", "p-256", "p-384"])
def test_encrypted_image_decrypts_only_with_its_private_key(
    kind: str, tmp_path: Path, plain_image: tuple[Path, bytes]
) -> None:
    plain, secret = plain_image
    private, public = write_pair(tmp_path, "image", new_key(kind))
    skopeo_encrypt(plain, "v1", tmp_path / "enc", public)
    with pytest.raises(RuntimeError, match="encrypted layer"):
        read_file_from_image(tmp_path / "enc", "v1", "secret.txt")

    skopeo_decrypt(tmp_path / "enc", "v1", tmp_path / "dec", [private])
    assert read_file_from_image(tmp_path / "dec", "v1", "secret.txt") == secret
    assert read_file_from_image(tmp_path / "dec", "v1", "etc/motd") == b"hello\n"

    other, _ = write_pair(tmp_path, "other", new_key(kind))
    with pytest.raises(RuntimeError, match=WRONG_KEY):
        skopeo_decrypt(tmp_path / "enc", "v1", tmp_path / "wrong", [other])


def test_keys_installed_by_the_agent_decrypt_among_others(
    tmp_path: Path, plain_image: tuple[Path, bytes]
) -> None:
    """The files KeyDirectory writes are what skopeo/ocicrypt reads; extra keys do no harm."""
    plain, secret = plain_image
    image_key = new_key("p-256")
    private, public = write_pair(tmp_path, "image", image_key)
    decoy, _ = write_pair(tmp_path, "decoy", new_key("rsa-2048"))
    skopeo_encrypt(plain, "v1", tmp_path / "enc", public)
    kd = KeyDirectory(tmp_path / "crio-keys")
    kd.sync(
        [
            InstallableKey("decoy", 1, Secret(decoy.read_bytes())),
            InstallableKey("image", 3, Secret(private.read_bytes())),
        ]
    )
    installed = sorted((kd.root / "keylease").iterdir())
    assert [p.name for p in installed] == ["decoy.v1.pem", "image.v3.pem"]
    skopeo_decrypt(tmp_path / "enc", "v1", tmp_path / "dec", installed)
    assert read_file_from_image(tmp_path / "dec", "v1", "secret.txt") == secret


def test_ocicrypt_refuses_sec1_pem_which_is_why_the_agent_does(
    tmp_path: Path, plain_image: tuple[Path, bytes]
) -> None:
    """The premise of agent.keystore.ocikey's SEC1 refusal, measured against the real parser."""
    plain, _ = plain_image
    key = ec.generate_private_key(ec.SECP256R1())
    _, public = write_pair(tmp_path, "image", key)
    sec1 = tmp_path / "sec1.pem"
    sec1.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    skopeo_encrypt(plain, "v1", tmp_path / "enc", public)
    with pytest.raises(RuntimeError, match="skopeo copy"):
        skopeo_decrypt(tmp_path / "enc", "v1", tmp_path / "dec", [sec1])

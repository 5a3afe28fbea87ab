"""Real OCI images for tests and the demo: build one offline, encrypt and decrypt it with skopeo.

Images are OCI image layouts on disk (``oci:<dir>:<tag>``), so nothing needs a registry or the
network; the runtime tests push them to a registry on 127.0.0.1 (``skopeo_push``) and pull them
back (``skopeo_fetch``). skopeo runs with ``--insecure-policy`` and a private environment (empty
registries config, its own HOME and TMPDIR), so no /etc/containers configuration is needed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "make_layered_image",
    "make_oci_image",
    "read_file_from_image",
    "skopeo_decrypt",
    "skopeo_encrypt",
    "skopeo_fetch",
    "skopeo_push",
]

SKOPEO = "skopeo"
SKOPEO_TIMEOUT = 120
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = _digest(data)
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _layer_tar(files: Mapping[str, bytes], executable: Collection[str] = ()) -> bytes:
    """A reproducible tar: sorted names, parent directories, mtime 0, root-owned; the names in
    ``executable`` get mode 0755, other files 0644."""
    entries: dict[str, bytes | None] = {}
    for name, content in files.items():
        clean = name.strip("/")
        if not clean or ".." in clean.split("/"):
            raise ValueError(f"bad file name for an image layer: {name!r}")
        parts = clean.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), None)
        entries[clean] = content
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            data = entries[name]
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o755 if name in executable else 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_oci_image(
    layout: Path, tag: str, files: Mapping[str, bytes], *, executable: Collection[str] = ()
) -> None:
    """Write a one-layer image holding ``files`` into the OCI layout ``layout`` as ``tag``."""
    make_layered_image(layout, tag, [files], executable=executable)


def make_layered_image(
    layout: Path,
    tag: str,
    layers: Sequence[Mapping[str, bytes]],
    *,
    executable: Collection[str] = (),
) -> None:
    """Write an image with one layer per mapping of ``layers`` (bottom first) into the OCI
    layout ``layout`` as ``tag``; files named in ``executable`` are mode 0755."""
    if not layers:
        raise ValueError("an image needs at least one layer")
    layout.mkdir(parents=True, exist_ok=True)
    tars = [_layer_tar(files, {name.strip("/") for name in executable}) for files in layers]
    blobs = [_put_blob(layout, gzip.compress(tar, mtime=0)) for tar in tars]
    config = _put_blob(
        layout,
        _canonical(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [_digest(tar) for tar in tars]},
            }
        ),
    )
    manifest = _put_blob(
        layout,
        _canonical(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": {"mediaType": CONFIG, **config},
                "layers": [{"mediaType": LAYER, **blob} for blob in blobs],
            }
        ),
    )
    index_path = layout / "index.json"
    index: dict[str, Any] = (
        json.loads(index_path.read_text())
        if index_path.exists()
        else {"schemaVersion": 2, "manifests": []}
    )
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ] + [{"mediaType": MANIFEST, **manifest, "annotations": {REF_NAME: tag}}]
    index_path.write_bytes(_canonical(index))
    (layout / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))


def _manifest(layout: Path, tag: str) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    for entry in index.get("manifests", []):
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            blob = layout / "blobs" / "sha256" / entry["digest"].removeprefix("sha256:")
            manifest: dict[str, Any] = json.loads(blob.read_text())
            return manifest
    raise LookupError(f"no image tagged {tag!r} in {layout}")


def _layer_types(layout: Path, tag: str) -> list[str]:
    return [str(layer["mediaType"]) for layer in _manifest(layout, tag)["layers"]]


def _skopeo(*args: str, binary: Path | str = SKOPEO) -> None:
    """Run ``skopeo --insecure-policy ARGS`` offline; RuntimeError with its stderr on failure."""
    with tempfile.TemporaryDirectory(prefix="keylease-skopeo-") as scratch:
        home = Path(scratch)
        (home / "registries.conf").write_text("")
        (home / "registries.d").mkdir()
        (home / "tmp").mkdir()
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(home),
            "XDG_CONFIG_HOME": str(home),
            "TMPDIR": str(home / "tmp"),
            "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"),
            "CONTAINERS_CONF": str(home / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(home / "auth.json"),
            "LANG": "C.UTF-8",
        }
        argv = [
            str(binary),
            "--insecure-policy",
            "--registries.d",
            str(home / "registries.d"),
            "--command-timeout",
            f"{SKOPEO_TIMEOUT}s",
            *args,
        ]
        try:
            proc = subprocess.run(
                argv,
                env=env,
                capture_output=True,
                text=True,
                timeout=SKOPEO_TIMEOUT + 10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"skopeo {args[0]} could not run: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"skopeo {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )


def skopeo_encrypt(src: Path, tag: str, dst: Path, public_key_pem: Path) -> None:
    """Copy ``oci:src:tag`` to ``oci:dst:tag`` with every layer JWE-encrypted to the key."""
    _skopeo(
        "copy",
        "--encryption-key",
        f"jwe:{public_key_pem}",
        f"oci:{src}:{tag}",
        f"oci:{dst}:{tag}",
    )
    types = _layer_types(dst, tag)
    if not types or not all(t.endswith("+encrypted") for t in types):
        raise RuntimeError(f"skopeo left layers of oci:{dst}:{tag} unencrypted: {types}")


def skopeo_decrypt(src: Path, tag: str, dst: Path, private_keys: Sequence[Path]) -> None:
    """Copy ``oci:src:tag`` to ``oci:dst:tag`` decrypting with the private key files.

    Raises RuntimeError (with skopeo's message) if skopeo fails or a layer stays encrypted.
    """
    _decrypting_copy(f"oci:{src}:{tag}", dst, tag, private_keys)


def skopeo_push(src: Path, tag: str, reference: str, recipients: Sequence[Path] = ()) -> None:
    """Copy ``oci:src:tag`` to ``docker://reference`` (a registry on 127.0.0.1, plain HTTP),
    every layer JWE-encrypted to each public key in ``recipients`` when there are any."""
    flags = [arg for key in recipients for arg in ("--encryption-key", f"jwe:{key}")]
    _skopeo("copy", "--dest-tls-verify=false", *flags, f"oci:{src}:{tag}", f"docker://{reference}")


def skopeo_fetch(
    reference: str,
    dst: Path,
    tag: str,
    private_keys: Sequence[Path],
    *,
    binary: Path | str = SKOPEO,
) -> None:
    """Copy ``docker://reference`` (plain HTTP) to ``oci:dst:tag`` decrypting with the private
    key files, using the skopeo at ``binary``. RuntimeError (with skopeo's message) if skopeo
    fails or a layer stays encrypted."""
    _decrypting_copy(
        f"docker://{reference}", dst, tag, private_keys, "--src-tls-verify=false", binary=binary
    )


def _decrypting_copy(
    source: str,
    dst: Path,
    tag: str,
    private_keys: Sequence[Path],
    *flags: str,
    binary: Path | str = SKOPEO,
) -> None:
    """``skopeo copy FLAGS --decryption-key KEY... SOURCE oci:dst:tag``, then check no layer
    stayed encrypted (without --decryption-key, skopeo copies an encrypted image as it is)."""
    if not private_keys:
        raise ValueError("decrypting needs at least one private key file")
    key_flags = [arg for key in private_keys for arg in ("--decryption-key", str(key))]
    _skopeo("copy", *flags, *key_flags, source, f"oci:{dst}:{tag}", binary=binary)
    types = _layer_types(dst, tag)
    if any(t.endswith("+encrypted") for t in types):
        raise RuntimeError(f"skopeo copied {source} but left layers encrypted: {types}")


def read_file_from_image(layout: Path, tag: str, name: str) -> bytes:
    """The content of ``name`` in the image (the topmost layer holding it).

    Raises RuntimeError if a layer is still encrypted, LookupError if no layer holds the file.
    """
    wanted = name.strip("/")
    layers = _manifest(layout, tag)["layers"]
    for layer in reversed(layers):
        media_type = str(layer["mediaType"])
        if "+encrypted" in media_type:
            raise RuntimeError(f"oci:{layout}:{tag} has an encrypted layer ({media_type})")
        blob = (layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")).read_bytes()
        if _digest(blob) != layer["digest"]:
            raise RuntimeError(f"layer {layer['digest']} of oci:{layout}:{tag} is corrupt")
        if "gzip" in media_type:
            blob = gzip.decompress(blob)
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for member in tar.getmembers():
                if member.name.removeprefix("./").strip("/") == wanted and member.isfile():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    return bytes(extracted.read())
    raise LookupError(f"{name} is not in oci:{layout}:{tag}")

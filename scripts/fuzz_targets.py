"""The fuzz targets of ``scripts.fuzz``: every parser of untrusted bytes, through its public entry
point, with the only exceptions it may raise (its package's error root) and seed inputs.

Each target is a small function of the input bytes that calls one entry point, so that when a
parser moves (issue 9 rewrites the event log parser, issue 12 the key bundle), re-pointing the
target is one line. Anything other than the package's own errors escaping a target is a crash.

- ``tpm_public``: ``kbs.tpm.objects.parse_public`` + ``check_ak_attributes``; ``KbsError``
- ``quote``: ``kbs.quote.verify_quote``, over raw bytes or over a fuzzed TPMS_ATTEST that this
  harness signs with its AK (so the checks after the signature are reached); ``KbsError``
- ``event_log``: ``kbs.eventlog.parse_event_log`` + ``replay``; ``KbsError``
- ``ek_certificate``: ``kbs.tpm.ekcert.verify_ek_certificate`` + ``check_ek_matches`` +
  ``ek_hash``, against a root and an intermediate; ``KbsError``
- ``node_requests``: the node service's request parsing (protobuf, then ``_enrollment_request``,
  ``_evidence``, the name checks); ``KbsError``
- ``release_bundle``: ``agent.release.parse_bundle`` (the decrypted KeyBundle); ``AgentError``
- ``release_cache``: ``agent.keystore.SealedCache.load`` + ``changed_pcrs`` (``release.bin``,
  ``release-pcrs.json``); ``AgentError``
- ``agent_config``: ``agent.config.load_config``; ``agent.errors.ConfigError``
- ``kbs_config``: ``kbs.config.load_config``; ``kbs.errors.ConfigError``

Import this module only once the fuzzer's instrumentation is in place (``scripts.fuzz`` does).
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from google.protobuf.message import DecodeError
from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_ECC_SCHEME

from agent import config as agent_config
from agent.errors import AgentError
from agent.errors import ConfigError as AgentConfigError
from agent.keystore.cache import RELEASE, RELEASE_PCRS, SealedCache
from agent.release import parse_bundle
from agent.state import StateDir
from kbs import config as kbs_config
from kbs.errors import ConfigError as KbsConfigError
from kbs.errors import KbsError
from kbs.eventlog import parse_event_log, replay
from kbs.model import check_node_name
from kbs.nodeapi import service
from kbs.quote import qualified_name, verify_quote
from kbs.tpm.ekcert import (
    EK_CERTIFICATE_EKU,
    EkTrustBundle,
    check_ek_matches,
    ek_hash,
    load_ek_roots,
    verify_ek_certificate,
)
from kbs.tpm.objects import TpmPublic, check_ak_attributes, parse_public
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1 import qualifying_data
from keylease.api.v1.limits import MAX_NODE_NAME

__all__ = ["SCRATCH_ENV", "TARGETS", "Target"]

SCRATCH_ENV = "KEYLEASE_FUZZ_SCRATCH"

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 6, 1, tzinfo=UTC)
NONCE = bytes(range(32))
NODE = "fuzz-node"
REQUIRED_PCRS = frozenset({0, 7})


@cache
def _work() -> Path:
    """A scratch directory for the targets that read files: ``$KEYLEASE_FUZZ_SCRATCH`` (which
    ``scripts.fuzz`` makes on tmpfs and removes), else a new one on tmpfs."""
    given = os.environ.get(SCRATCH_ENV)
    return Path(given) if given else Path(tempfile.mkdtemp(prefix="keylease-fuzz-", dir="/dev/shm"))


@dataclass(frozen=True)
class Target:
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]  # what the parser may raise: its package's errors
    seeds: Callable[[], Iterator[bytes]]
    modules: tuple[str, ...]  # the code under test (line coverage is reported for these)
    max_len: int = 4096


# --- keys made from fixed numbers, so that seeds from earlier runs stay valid ------------------


def _ec_key(n: int, curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(0x6B65796C65617365 + n, curve or ec.SECP256R1())


def _tpm_public(key: ec.EllipticCurvePrivateKey, attributes: int) -> bytes:
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = TPM2B_PUBLIC.from_pem(pem, objectAttributes=attributes)
    if attributes & TPMA_OBJECT.SIGN_ENCRYPT:
        public.publicArea.parameters.eccDetail.scheme = TPMT_ECC_SCHEME(
            scheme=TPM2_ALG.ECDSA, details={"ecdsa": {"hashAlg": TPM2_ALG.SHA256}}
        )
    else:
        public.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.AES
        public.publicArea.parameters.eccDetail.symmetric.keyBits.aes = 128
        public.publicArea.parameters.eccDetail.symmetric.mode.aes = TPM2_ALG.CFB
    return bytes(public.marshal())


AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
)  # fmt: skip
EK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.ADMINWITHPOLICY
)  # fmt: skip


@cache
def _ak() -> tuple[ec.EllipticCurvePrivateKey, TpmPublic, TpmPublic]:
    """The harness's AK (with its private key, to sign fuzzed attestations) and EK."""
    ak_key, ek_key = _ec_key(1), _ec_key(2)
    ak = parse_public(_tpm_public(ak_key, AK_ATTRIBUTES), "AK")
    ek = parse_public(_tpm_public(ek_key, EK_ATTRIBUTES), "EK")
    return ak_key, ak, ek


# --- TPM public areas --------------------------------------------------------------------------


def fuzz_tpm_public(data: bytes) -> None:
    check_ak_attributes(parse_public(data, "fuzzed public area"))


def _public_seeds() -> Iterator[bytes]:
    yield _tpm_public(_ec_key(1), AK_ATTRIBUTES)
    yield _tpm_public(_ec_key(2), EK_ATTRIBUTES)
    yield _tpm_public(_ec_key(3, ec.SECP384R1()), AK_ATTRIBUTES)
    yield _tpm_public(_ec_key(4), AK_ATTRIBUTES & ~TPMA_OBJECT.RESTRICTED)


# --- quotes ------------------------------------------------------------------------------------
# Input: mode (1 byte), PCR count k (1 byte), k x (index byte, 32-byte value), then
#   mode 0 ("raw"): signature length (2 bytes), the TPMT_SIGNATURE, the TPM2B_ATTEST;
#   mode 1 ("signed"): a TPMS_ATTEST body, which the harness wraps and signs with its AK.


def fuzz_quote(data: bytes) -> None:
    ak_key, ak, ek = _ak()
    if len(data) < 2:
        return
    mode, count, pos = data[0] & 1, data[1] % 25, 2
    pcrs: dict[int, bytes] = {}
    for _ in range(count):
        if pos + 33 > len(data):
            return
        pcrs[data[pos]] = data[pos + 1 : pos + 33]
        pos += 33
    if mode == 0:
        size = int.from_bytes(data[pos : pos + 2], "big")
        signature, quote = data[pos + 2 : pos + 2 + size], data[pos + 2 + size :]
    else:
        body = data[pos:]
        quote = len(body).to_bytes(2, "big") + body
        signature = _sign(ak_key, body)
    verify_quote(
        ak, quote, signature, qualifying_data(NONCE), "sha256", pcrs, required=REQUIRED_PCRS, ek=ek
    )


def _sign(key: ec.EllipticCurvePrivateKey, body: bytes) -> bytes:
    r, s = decode_dss_signature(
        key.sign(body, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    )
    rb, sb = r.to_bytes(32, "big"), s.to_bytes(32, "big")
    return (
        struct.pack(">HHH", TPM2_ALG.ECDSA, TPM2_ALG.SHA256, 32) + rb + struct.pack(">H", 32) + sb
    )


def _attest_body(pcrs: dict[int, bytes], signer: bytes, extra: bytes) -> bytes:
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    digest = hashlib.sha256(b"".join(pcrs[i] for i in sorted(pcrs))).digest()
    return (
        struct.pack(">IH", 0xFF544347, 0x8018)
        + struct.pack(">H", len(signer)) + signer
        + struct.pack(">H", len(extra)) + extra
        + struct.pack(">QIIB", 123456, 3, 1, 1) + bytes(8)
        + struct.pack(">IHB", 1, TPM2_ALG.SHA256, 3) + bytes(bitmap)
        + struct.pack(">H", len(digest)) + digest
    )  # fmt: skip


def _quote_input(mode: int, pcrs: dict[int, bytes], rest: bytes) -> bytes:
    head = bytes([mode, len(pcrs)]) + b"".join(bytes([i]) + v for i, v in sorted(pcrs.items()))
    return head + rest


def _quote_seeds() -> Iterator[bytes]:
    ak_key, ak, ek = _ak()
    pcrs = {i: hashlib.sha256(bytes([i])).digest() for i in range(8)}
    good = _attest_body(pcrs, qualified_name(ek, ak), qualifying_data(NONCE))
    yield _quote_input(1, pcrs, good)
    yield _quote_input(1, {0: pcrs[0], 7: pcrs[7]}, good)
    yield _quote_input(1, pcrs, _attest_body(pcrs, qualified_name(ek, ak), b"other nonce"))
    signed = len(good).to_bytes(2, "big") + good
    signature = _sign(ak_key, good)
    yield _quote_input(0, pcrs, len(signature).to_bytes(2, "big") + signature + signed)


# --- the boot event log (issue 9 replaces kbs.eventlog: re-point here) ---------------------------


def fuzz_event_log(data: bytes) -> None:
    replay(parse_event_log(data), "sha256")


def _event_log_seeds() -> Iterator[bytes]:
    for path in sorted((ROOT / "tests" / "data" / "eventlogs").glob("*.bin")):
        yield path.read_bytes()


# --- EK certificates ---------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fuzz TPM Maker"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # fmt: skip


def _ca_cert(
    key: ec.EllipticCurvePrivateKey, cn: str, issuer: tuple[ec.EllipticCurvePrivateKey, str] | None
) -> x509.Certificate:
    signer, issuer_cn = issuer or (key, cn)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(cn.encode()).digest()[:4], "big") | 1)
        .not_valid_before(NOW - timedelta(days=3650))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(signer, hashes.SHA256(), ecdsa_deterministic=True)
    )


@cache
def _ek_pki() -> tuple[EkTrustBundle, ec.EllipticCurvePrivateKey]:
    """The trust bundle (a root and an intermediate, as ek_roots holds them) and the issuing
    intermediate's key."""
    root_key, inter_key = _ec_key(10), _ec_key(11)
    root = _ca_cert(root_key, "Fuzz EK Root", None)
    inter = _ca_cert(inter_key, "Fuzz EK Intermediate", (root_key, "Fuzz EK Root"))
    path = _work() / "ek-roots.pem"
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (root, inter)))
    return load_ek_roots(path), inter_key


def fuzz_ek_certificate(data: bytes) -> None:
    bundle, _ = _ek_pki()
    cert = verify_ek_certificate(data, bundle, NOW)
    ek = _ec_key(2).public_key()
    check_ek_matches(cert, ek)
    ek_hash(ek)


def _ek_seeds() -> Iterator[bytes]:
    _, inter_key = _ek_pki()
    for i, key in enumerate((_ec_key(2), _ec_key(5, ec.SECP384R1()))):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(_name("Fuzz EK Intermediate"))
            .public_key(key.public_key())
            .serial_number(1000 + i)
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=3650))
            .add_extension(x509.ExtendedKeyUsage([EK_CERTIFICATE_EKU]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.DirectoryName(_name(f"tpm {i}"))]), critical=True
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        cert = builder.sign(inter_key, hashes.SHA256(), ecdsa_deterministic=True)
        yield cert.public_bytes(serialization.Encoding.DER)


# --- node requests, through the node service's request parsing ---------------------------------
# Input: the method (1 byte), then the request message as it arrives on the wire.

_REQUESTS = (
    pb.StartEnrollmentRequest, pb.FinishEnrollmentRequest, pb.GetNonceRequest,
    pb.AttestRequest, pb.WatchRequest,
)  # fmt: skip


def fuzz_node_requests(data: bytes) -> None:
    if not data:
        return
    kind = _REQUESTS[data[0] % len(_REQUESTS)]
    try:
        request = kind.FromString(data[1:])
    except DecodeError:
        return  # refused by gRPC's deserializer before any of our code runs
    if isinstance(request, pb.StartEnrollmentRequest):
        enrollment = service._enrollment_request(request)
        check_node_name(enrollment.node_name)
    elif isinstance(request, pb.FinishEnrollmentRequest):
        service._bounded("enrollment_id", request.enrollment_id, 64)
        service._bounded("secret", request.secret, 64)
    elif isinstance(request, pb.AttestRequest):
        check_node_name(service._evidence(request).node_name)
    else:
        service._bounded("node_name", request.node_name, MAX_NODE_NAME)
        check_node_name(request.node_name)


def _request_seeds() -> Iterator[bytes]:
    _, ak, ek = _ak()
    yield bytes([0]) + pb.StartEnrollmentRequest(
        node_name=NODE, ek_certificate=next(_ek_seeds()), ek_public=ek.raw, ak_public=ak.raw,
        metadata={"os": "debian"},
    ).SerializeToString()  # fmt: skip
    yield (
        bytes([1])
        + pb.FinishEnrollmentRequest(enrollment_id="e" * 32, secret=b"s" * 32).SerializeToString()
    )
    yield bytes([2]) + pb.GetNonceRequest(node_name=NODE).SerializeToString()
    yield bytes([3]) + pb.AttestRequest(
        node_name=NODE, nonce=NONCE, quote=b"q" * 100, signature=b"s" * 70, pcr_bank="sha256",
        pcrs=[pb.PcrValue(index=i, value=bytes(32)) for i in range(8)], event_log=b"log",
    ).SerializeToString()  # fmt: skip
    yield bytes([4]) + pb.WatchRequest(node_name=NODE).SerializeToString()


# --- the agent's side: key bundles and the sealed cache (issue 12 changes key versions) --------


def fuzz_release_bundle(data: bytes) -> None:
    parse_bundle(data, NODE)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _bundle_seeds() -> Iterator[bytes]:
    issued = int(NOW.timestamp())
    keys = [pb.BundledKey(name="prod-eu", version=3, private_key_pem=_pkcs8(_ec_key(20)))]
    yield pb.KeyBundle(node_name=NODE, issued_at_unix=issued, not_after_unix=issued + 3600,
                       keys=keys).SerializeToString()  # fmt: skip
    keys.append(pb.BundledKey(name="legacy", version=1,
                              private_key_pem=_pkcs8(_ec_key(21, ec.SECP384R1()))))  # fmt: skip
    yield pb.KeyBundle(node_name=NODE, issued_at_unix=issued, not_after_unix=issued + 60,
                       keys=keys).SerializeToString()  # fmt: skip


@cache
def _state() -> SealedCache:
    return SealedCache(StateDir.open(_work() / "state"))


def fuzz_release_cache(data: bytes) -> None:
    """Input: the length of ``release.bin`` (2 bytes), ``release.bin``, ``release-pcrs.json``."""
    cache = _state()
    size = int.from_bytes(data[:2], "big")
    directory = _work() / "state"
    (directory / RELEASE).write_bytes(data[2 : 2 + size])
    (directory / RELEASE_PCRS).write_bytes(data[2 + size :])
    cache.load()
    cache.changed_pcrs(lambda bank, indices: {i: bytes(32) for i in indices})


def _cache_seeds() -> Iterator[bytes]:
    release = pb.Release(
        node_name=NODE, duplicate=b"d" * 100, in_sym_seed=b"s" * 256, sealed_public=b"p" * 80,
        pcr_bank="sha256", pcr_indices=[0, 7], bundle_nonce=b"n" * 12, bundle_ciphertext=b"c" * 300,
    ).SerializeToString()  # fmt: skip
    pcrs = b'{"bank": "sha256", "pcrs": {"0": "' + b"00" * 32 + b'", "7": "' + b"11" * 32 + b'"}}'
    yield len(release).to_bytes(2, "big") + release + pcrs


# --- config files ------------------------------------------------------------------------------


def _config_file(data: bytes) -> Path:
    """``data`` as a config file, next to an ``agent-ca.pem`` (relative paths resolve there, so
    seeds and corpus entries stay valid from one run to the next)."""
    ca = _work() / "agent-ca.pem"
    if not ca.exists():
        ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    path = _work() / "fuzz.toml"
    path.write_bytes(data)
    return path


def fuzz_agent_config(data: bytes) -> None:
    agent_config.load_config(_config_file(data))


def fuzz_kbs_config(data: bytes) -> None:
    kbs_config.load_config(_config_file(data))


def _agent_config_seeds() -> Iterator[bytes]:
    yield (
        b'kbs = "kbs.example.net:8443"\nkbs_ca = "agent-ca.pem"\ntcti = "device:/dev/tpmrm0"\n'
        b'state_dir = "/var/lib/keylease"\nnode_name = "worker-1"\n'
        b'key_dirs = ["/etc/crio/keys", "/etc/containerd/ocicrypt/keys"]\nevent_log = ""\n'
        b"rpc_timeout_seconds = 10\nstartup_timeout_seconds = 30\nretry_max_seconds = 60.5\n"
        b"remove_keys_on_stop = false\nunsafe_allow_disk_key_dirs = false\n"
    )


def _kbs_config_seeds() -> Iterator[bytes]:
    yield (ROOT / "tests" / "data" / "fuzz" / "kbs.toml").read_bytes()
    yield (
        b'listen = "[::]:8443"\ndatabase = "postgresql://kbs@db/kbs"\nenrollment = "ek-ca"\n'
        b'admin_listen = ""\nmetrics_listen = "127.0.0.1:0"\nprevious_master_keys = ["old.key"]\n'
        b"rate_limit_peer_per_second = 0\nmax_connections = 100\n"
    )


TARGETS: dict[str, Target] = {
    "tpm_public": Target(fuzz_tpm_public, (KbsError,), _public_seeds, ("kbs.tpm.objects",)),
    "quote": Target(fuzz_quote, (KbsError,), _quote_seeds, ("kbs.quote",)),
    "event_log": Target(
        fuzz_event_log, (KbsError,), _event_log_seeds, ("kbs.eventlog",), max_len=65536
    ),
    "ek_certificate": Target(
        fuzz_ek_certificate, (KbsError,), _ek_seeds, ("kbs.tpm.ekcert",), max_len=8192
    ),
    "node_requests": Target(
        fuzz_node_requests,
        (KbsError,),
        _request_seeds,
        ("kbs.nodeapi.service", "kbs.model"),
        max_len=8192,
    ),
    "release_bundle": Target(
        fuzz_release_bundle,
        (AgentError,),
        _bundle_seeds,
        ("agent.release", "agent.keystore.ocikey"),
        max_len=8192,
    ),
    "release_cache": Target(
        fuzz_release_cache, (AgentError,), _cache_seeds, ("agent.keystore.cache", "agent.state")
    ),
    "agent_config": Target(
        fuzz_agent_config,
        (AgentConfigError,),
        _agent_config_seeds,
        ("agent.config", "keylease.tomlfile"),
    ),
    "kbs_config": Target(
        fuzz_kbs_config,
        (KbsConfigError,),
        _kbs_config_seeds,
        ("kbs.config", "keylease.tomlfile"),
    ),
}

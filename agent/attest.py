"""One attestation round (DESIGN.md steps 1-4): enroll if needed, quote, receive, install.

On a denial the keys this agent installed are removed at once, and the cached release dropped.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

from agent.client import BrokerClient, NodeUnknown, Outcome
from agent.config import AgentConfig
from agent.errors import AttestationDenied, KeystoreError, PendingApproval, StateError
from agent.keystore import KeyDirectory
from agent.memfs import is_memory_backed, require_memory_backed
from agent.netwatch import addresses
from agent.release import Bundle, open_release
from agent.state import Enrollment, StateDir
from agent.tpm import AkBlobs, Tpm
from keylease.api.v1 import qualifying_data

__all__ = [
    "AttestReport",
    "attest_once",
    "enroll",
    "install_keys",
    "key_directories",
    "remove_all_keys",
]

log = logging.getLogger(__name__)

MAX_EVENT_LOG = 1 << 20
MAX_INTERFACES = 16  # the broker accepts 32 metadata entries
AGENT_VERSION = "0.1.0"


@dataclass(frozen=True)
class AttestReport:
    node_name: str
    bundle: Bundle
    installed: tuple[str, ...]
    removed: tuple[str, ...]


def enroll(cfg: AgentConfig, tpm: Tpm, client: BrokerClient, state: StateDir) -> AkBlobs:
    """Create the AK if there is none, then enroll (EK cert, AK, credential activation)."""
    ak = state.load_ak()
    if ak is None:
        ak = tpm.create_ak()
        state.save_ak(ak)
        log.info("created attestation key node=%s", cfg.node_name)
    ek = tpm.read_ek()
    challenge = client.start_enrollment(
        cfg.node_name, ek.certificate, ek.public, ak.public, enrollment_metadata()
    )
    secret = tpm.activate_credential(ak, challenge.credential_blob, challenge.encrypted_secret)
    node_state = client.finish_enrollment(challenge.enrollment_id, secret.reveal())
    state.save_enrollment(Enrollment(node_name=cfg.node_name, kbs=cfg.kbs, state=node_state))
    log.info("enroll node=%s result=ok state=%s", cfg.node_name, node_state)
    return ak


def enrollment_metadata() -> dict[str, str]:
    """Informational only (the broker never trusts it): agent version, host name, addresses."""
    metadata = {"agent_version": AGENT_VERSION, "hostname": platform.node()[:255]}
    for ifname, addrs in sorted(addresses().items())[:MAX_INTERFACES]:
        metadata[f"address.{ifname}"[:255]] = ",".join(addrs)[:255]
    return metadata


def _enrolled_ak(cfg: AgentConfig, tpm: Tpm, client: BrokerClient, state: StateDir) -> AkBlobs:
    ak = state.load_ak()
    record = state.load_enrollment()
    if ak is None or record is None or record.node_name != cfg.node_name or record.kbs != cfg.kbs:
        return enroll(cfg, tpm, client, state)
    return ak


def _read_event_log(path: Path | None) -> bytes:
    if path is None:
        return b""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_EVENT_LOG + 1)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise StateError(f"cannot read the boot event log {path}: {exc.strerror}") from None
    if len(data) > MAX_EVENT_LOG:
        raise StateError(f"boot event log {path} is larger than {MAX_EVENT_LOG} bytes")
    return data


def key_directories(cfg: AgentConfig) -> list[KeyDirectory]:
    return [KeyDirectory(d) for d in cfg.key_dirs]


def install_keys(cfg: AgentConfig, bundle: Bundle) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Install the bundle's keys into every key directory (memory-backed only, unless the
    operator set unsafe_allow_disk_key_dirs). Returns (files present, files removed)."""
    directories = key_directories(cfg)
    for kd in directories:
        if cfg.unsafe_allow_disk_key_dirs:
            if not _memory_backed(kd):
                log.warning(
                    "unsafe_allow_disk_key_dirs: installing plaintext keys into %s, which is "
                    "not on tmpfs",
                    kd.directory,
                )
        else:
            require_memory_backed(kd.directory)
    installed: list[str] = []
    removed: list[str] = []
    for kd in directories:
        result = kd.sync(bundle.keys)
        installed += [f"{kd.directory}/{n}.pem" for n in result.installed + result.unchanged]
        removed += [f"{kd.directory}/{n}.pem" for n in result.removed]
    return tuple(installed), tuple(removed)


def _memory_backed(kd: KeyDirectory) -> bool:
    try:
        return is_memory_backed(kd.directory)
    except OSError:
        return False


def remove_all_keys(cfg: AgentConfig, state: StateDir) -> tuple[str, ...]:
    """Remove every key this agent installed, and the cached release. Returns what was removed."""
    removed: list[str] = []
    failures: list[KeystoreError] = []
    for kd in key_directories(cfg):
        try:
            removed += [f"{kd.directory}/{name}.pem" for name in kd.clear()]
        except KeystoreError as exc:  # clear every other directory before reporting it
            failures.append(exc)
    state.drop_release()
    if failures:
        raise KeystoreError("; ".join(str(f) for f in failures))
    return tuple(removed)


def attest_once(cfg: AgentConfig, tpm: Tpm, client: BrokerClient, state: StateDir) -> AttestReport:
    """Attest and install the released keys; raise a specific AgentError otherwise."""
    ak = _enrolled_ak(cfg, tpm, client, state)
    try:
        nonce = client.get_nonce(cfg.node_name)
    except NodeUnknown:
        log.info("broker does not know node=%s; enrolling again", cfg.node_name)
        state.forget_enrollment()
        ak = enroll(cfg, tpm, client, state)
        nonce = client.get_nonce(cfg.node_name)
    quote = tpm.quote(ak, qualifying_data(nonce))
    event_log = _read_event_log(cfg.event_log)
    try:
        reply = client.attest(cfg.node_name, nonce, quote, event_log)
    except AttestationDenied as exc:
        dropped = remove_all_keys(cfg, state)
        log.info("attest node=%s result=denied reason=%s", cfg.node_name, exc)
        raise AttestationDenied(_denial_text(str(exc), dropped)) from None
    if reply.outcome is Outcome.PENDING_APPROVAL or reply.release is None:
        log.info("attest node=%s result=pending", cfg.node_name)
        raise PendingApproval(
            f"node {cfg.node_name} is enrolled and attested, pending operator approval: "
            f"keylease-kbs node approve {cfg.node_name} --label k=v"
        )
    bundle = open_release(tpm, reply.release, cfg.node_name)
    installed, removed = install_keys(cfg, bundle)
    sealed = reply.release.sealed
    state.save_release(
        reply.release.serialize(),
        sealed.pcr_bank,
        {i: quote.pcrs[i] for i in sealed.pcr_indices if i in quote.pcrs},
    )
    log.info(
        "attest node=%s result=ok keys=%s until=%s",
        cfg.node_name,
        bundle.describe(),
        bundle.not_after.isoformat(),
    )
    return AttestReport(cfg.node_name, bundle, installed, removed)


def _denial_text(reason: str, removed: tuple[str, ...]) -> str:
    text = f"attestation denied: {reason}"
    if removed:
        text += f"; removed {len(removed)} key file(s): {', '.join(removed)}"
    return text

"""Enrollment (DESIGN.md step 1): the EK certificate, a new AK, credential activation, and the
node key every later call is authenticated with.

Once per node and broker: the AK is created once and kept in the state directory; the
enrollment record says which broker knows it under which name, so a changed ``node_name`` or
``kbs`` enrolls again (same EK, same AK). The broker's challenge is kept too
(``credential.bin``): the node key is derived from the secret inside it
(``keylease.api.v1.nodeauth``), which only this TPM can recover (ActivateCredential, ~8 ms), so
the key itself is never written anywhere and a copy of the state directory is useless without
the TPM.
"""

from __future__ import annotations

import logging
import platform
import threading
from dataclasses import dataclass

from agent.blobs import AkBlobs, Credential, NodeIdentity
from agent.broker import BrokerClient
from agent.config import AgentConfig
from agent.errors import TpmError
from agent.netwatch import addresses
from agent.state import Enrollment, StateDir
from agent.tpm import Tpm
from keylease.api.v1.limits import MAX_METADATA_ENTRIES, MAX_METADATA_TEXT
from keylease.api.v1.nodeauth import node_key

__all__ = [
    "Enrolled",
    "NodeCredentials",
    "enroll",
    "enrolled",
    "enrollment_metadata",
    "node_identity",
]

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
MAX_INTERFACES = 16  # addresses of this many interfaces (by name) are plenty to recognise a node


@dataclass(frozen=True)
class Enrolled:
    ak: AkBlobs
    identity: NodeIdentity


class NodeCredentials:
    """The node identity last enrolled or recovered, in memory only; shared by the daemon's
    threads (the attestation loop sets it, the watch stream reads it)."""

    def __init__(self, identity: NodeIdentity | None = None) -> None:
        self._lock = threading.Lock()
        self._identity = identity

    def get(self) -> NodeIdentity | None:
        with self._lock:
            return self._identity

    def set(self, identity: NodeIdentity | None) -> None:
        with self._lock:
            self._identity = identity


def enroll(cfg: AgentConfig, tpm: Tpm, client: BrokerClient, state: StateDir) -> Enrolled:
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
    state.save_credential(Credential(challenge.credential_blob, challenge.encrypted_secret))
    state.save_enrollment(Enrollment(node_name=cfg.node_name, kbs=cfg.kbs, state=node_state))
    log.info("enroll node=%s result=ok state=%s", cfg.node_name, node_state)
    identity = NodeIdentity(cfg.node_name, node_key(secret.reveal(), cfg.node_name))
    return Enrolled(ak, identity)


def enrolled(
    cfg: AgentConfig,
    tpm: Tpm,
    client: BrokerClient,
    state: StateDir,
    identity: NodeIdentity | None = None,
) -> Enrolled:
    """The AK and node identity this broker knows this node by: enroll first unless the state
    directory says it is enrolled there. ``identity``: the node key already recovered (else it
    is recovered with the TPM)."""
    ak = state.load_ak()
    record = state.load_enrollment()
    credential = state.load_credential()
    if (
        ak is None
        or credential is None
        or record is None
        or record.node_name != cfg.node_name
        or record.kbs != cfg.kbs
    ):
        return enroll(cfg, tpm, client, state)
    if identity is not None and identity.node_name == cfg.node_name:
        return Enrolled(ak, identity)
    try:
        return Enrolled(ak, _recover(cfg, tpm, ak, credential))
    except TpmError as exc:
        log.warning("the enrollment challenge does not open in this TPM (%s); enrolling again", exc)
        return enroll(cfg, tpm, client, state)


def node_identity(cfg: AgentConfig, tpm: Tpm, state: StateDir) -> NodeIdentity | None:
    """The node key, recovered with the TPM, if this node is enrolled with ``cfg``'s broker under
    its name; None otherwise. Raises TpmError if the TPM cannot open the challenge."""
    ak = state.load_ak()
    record = state.load_enrollment()
    credential = state.load_credential()
    if ak is None or credential is None or record is None:
        return None
    if record.node_name != cfg.node_name or record.kbs != cfg.kbs:
        return None
    return _recover(cfg, tpm, ak, credential)


def _recover(cfg: AgentConfig, tpm: Tpm, ak: AkBlobs, credential: Credential) -> NodeIdentity:
    secret = tpm.activate_credential(ak, credential.credential_blob, credential.encrypted_secret)
    return NodeIdentity(cfg.node_name, node_key(secret.reveal(), cfg.node_name))


def enrollment_metadata() -> dict[str, str]:
    """Informational only (the broker never trusts it): agent version, host name, addresses."""
    metadata = {"agent_version": AGENT_VERSION, "hostname": _text(platform.node())}
    room = min(MAX_INTERFACES, MAX_METADATA_ENTRIES - len(metadata))
    for ifname, addrs in sorted(addresses().items())[:room]:
        metadata[_text(f"address.{ifname}")] = _text(",".join(addrs))
    return metadata


def _text(value: str) -> str:
    return value[:MAX_METADATA_TEXT]

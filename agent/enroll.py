"""Enrollment (DESIGN.md step 1): the EK certificate, a new AK, and credential activation.

Once per node and broker: the AK is created once and kept in the state directory; the
enrollment record says which broker knows it under which name, so a changed ``node_name`` or
``kbs`` enrolls again (same EK, same AK).
"""

from __future__ import annotations

import logging
import platform

from agent.blobs import AkBlobs
from agent.broker import BrokerClient
from agent.config import AgentConfig
from agent.netwatch import addresses
from agent.state import Enrollment, StateDir
from agent.tpm import Tpm
from keylease.api.v1.limits import MAX_METADATA_ENTRIES, MAX_METADATA_TEXT

__all__ = ["enroll", "enrolled_ak", "enrollment_metadata"]

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
MAX_INTERFACES = 16  # addresses of this many interfaces (by name) are plenty to recognise a node


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


def enrolled_ak(cfg: AgentConfig, tpm: Tpm, client: BrokerClient, state: StateDir) -> AkBlobs:
    """The AK this broker knows this node by: enroll first unless the record says it does."""
    ak = state.load_ak()
    record = state.load_enrollment()
    if ak is None or record is None or record.node_name != cfg.node_name or record.kbs != cfg.kbs:
        return enroll(cfg, tpm, client, state)
    return ak


def enrollment_metadata() -> dict[str, str]:
    """Informational only (the broker never trusts it): agent version, host name, addresses."""
    metadata = {"agent_version": AGENT_VERSION, "hostname": _text(platform.node())}
    room = min(MAX_INTERFACES, MAX_METADATA_ENTRIES - len(metadata))
    for ifname, addrs in sorted(addresses().items())[:room]:
        metadata[_text(f"address.{ifname}")] = _text(",".join(addrs))
    return metadata


def _text(value: str) -> str:
    return value[:MAX_METADATA_TEXT]

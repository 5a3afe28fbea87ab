"""Enrollment (DESIGN.md step 1): EK certificate, EK/AK binding, credential activation.

``start`` verifies everything that can be verified without the TPM's help and issues a
MakeCredential challenge; ``finish`` checks the ActivateCredential proof and records the node
with its node key, derived from the proven secret (``kbs.nodekeys``): from then on every call of
the node must carry a MAC made with that key. Nothing about a node is written until the proof is
correct.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from kbs.config import EnrollmentMode
from kbs.context import BrokerContext
from kbs.errors import ActivationFailed, NodeEkConflict, NotAllowlisted
from kbs.model import NodeState, PendingEnrollment, check_node_name
from kbs.nodekeys import seal_new_node_key
from kbs.tpm.credential import make_credential, new_challenge_secret
from kbs.tpm.ekcert import check_ek_matches, ek_hash, verify_ek_certificate
from kbs.tpm.objects import check_ak_attributes, parse_public

__all__ = ["Challenge", "EnrollmentRequest", "finish", "start"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnrollmentRequest:
    node_name: str
    ek_certificate: bytes
    ek_public: bytes
    ak_public: bytes
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Challenge:
    enrollment_id: str
    credential_blob: bytes
    encrypted_secret: bytes


def start(ctx: BrokerContext, req: EnrollmentRequest) -> Challenge:
    """Verify the EK certificate, EK/cert match and AK attributes; issue the challenge."""
    now = ctx.clock()
    check_node_name(req.node_name)
    ek = parse_public(req.ek_public, "ek_public")
    ak = parse_public(req.ak_public, "ak_public")
    cert = verify_ek_certificate(req.ek_certificate, ctx.ek_roots, now)
    check_ek_matches(cert, ek.key)
    check_ak_attributes(ak)
    digest = ek_hash(ek.key)
    existing = ctx.store.get_node(req.node_name)
    if existing is not None and existing.ek_hash != digest:
        raise NodeEkConflict(
            f"node {req.node_name!r} is enrolled with another EK (sha256 {existing.ek_hash}); "
            f"this EK is {digest}. If the node's TPM was replaced, revoke the old node and enroll "
            "the new one under a new name"
        )
    holder = ctx.store.node_by_ek(digest)
    if holder is not None and holder.name != req.node_name:
        raise NodeEkConflict(
            f"this TPM (EK sha256 {digest}) is already enrolled as node {holder.name!r}; one TPM "
            f"is one node: run the agent with node_name = {holder.name!r}, or revoke that node"
        )
    if (
        existing is None
        and ctx.config.enrollment is EnrollmentMode.ALLOWLIST
        and not ctx.store.is_ek_allowed(digest)
    ):
        raise NotAllowlisted(
            f"EK {digest} is not on the allowlist; an operator can add it with "
            f"`keylease-kbs allowlist add {digest}`"
        )
    secret = new_challenge_secret()
    credential_blob, encrypted_secret = make_credential(ek, ak.name, secret.reveal())
    enrollment_id = secrets.token_urlsafe(24)
    ctx.store.add_enrollment(
        PendingEnrollment(
            id=enrollment_id,
            node_name=req.node_name,
            ek_public=req.ek_public,
            ek_certificate=req.ek_certificate,
            ak_public=req.ak_public,
            ek_hash=digest,
            secret_sha256=hashlib.sha256(secret.reveal()).digest(),
            metadata=dict(req.metadata),
            expires_at=now + timedelta(seconds=ctx.config.enrollment_ttl_seconds),
        )
    )
    log.info("enroll challenge issued node=%s ek=%s", req.node_name, digest[:16])
    return Challenge(enrollment_id, credential_blob, encrypted_secret)


def finish(ctx: BrokerContext, enrollment_id: str, proof: bytes) -> tuple[str, NodeState]:
    """Check the activation proof; record (or re-key) the node. Returns (node name, state)."""
    now = ctx.clock()
    pending = ctx.store.take_enrollment(enrollment_id, now)
    if not hmac.compare_digest(hashlib.sha256(proof).digest(), pending.secret_sha256):
        ctx.store.audit(
            actor=f"node:{pending.node_name}",
            event="enroll",
            node=pending.node_name,
            result="refused",
            detail="ActivationFailed: activation proof does not match the challenge",
            now=now,
        )
        raise ActivationFailed(
            "activation proof does not match the challenge: the AK and EK are not in one TPM"
        )
    auto = ctx.config.enrollment in (EnrollmentMode.EK_CA, EnrollmentMode.ALLOWLIST)
    node = ctx.store.enroll_node(
        name=pending.node_name,
        ek_hash=pending.ek_hash,
        ek_public=pending.ek_public,
        ek_certificate=pending.ek_certificate,
        ak_public=pending.ak_public,
        state=NodeState.APPROVED if auto else NodeState.PENDING,
        metadata=pending.metadata,
        node_key=seal_new_node_key(ctx.master_key, pending.node_name, proof),
        now=now,
    )
    ctx.store.audit(
        actor=f"node:{node.name}",
        event="enroll",
        node=node.name,
        result="ok",
        detail=f"ek={node.ek_hash} mode={ctx.config.enrollment.value} state={node.state.value}",
        now=now,
    )
    log.info("enrolled node=%s state=%s", node.name, node.state.value)
    return node.name, node.state

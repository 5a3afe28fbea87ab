"""The admin API (``AdminService`` in ``admin.proto``): operator commands over mutual TLS, on a
listener of its own (``admin_listen``), separate from the node-facing one.

The TLS layer demands a client certificate chaining to ``admin_ca``; every RPC then checks it
again (``kbs.admin.certs.verify_admin_cert``: validity, EKU clientAuth, OU=keylease-admin, listed
in ``admin_certs``, and revoked neither in that file nor in the database's
``admin_revocations``, both read on each call) before anything else runs. The database is what
every replica shares, so ``admin-cert revoke`` on any host refuses the certificate here at once,
even if this host's copy of ``admin_certs`` is stale. While the database cannot be read the
check fails closed: the RPC is refused with UNAVAILABLE and a message naming the database (a
refusal on the file alone is still PERMISSION_DENIED). A node has no client certificate, and the
broker's own server certificate lacks the admin marker, so neither gets in. Conversely the node
listener never asks for client certificates, so an admin certificate means nothing there.

Each RPC runs the same ``kbs.admin.operator.LocalOperator`` action as the local command (in a
worker thread: the store blocks), with the audit actor ``operator:<certificate CN>``. Its
errors become status codes by ``kbs.status``, one entry per exact error class; the operator's
side (``kbs.admin.client``) turns them back into errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import grpc

from kbs import errors as e
from kbs.admin.actions import Admin
from kbs.admin.certs import load_admin_ca, verify_admin_cert
from kbs.admin.operator import LocalOperator
from kbs.admin.policies import PolicyChange
from kbs.admin.wire import (
    audit_to_pb,
    boot_to_pb,
    diff_to_pb,
    grant_to_pb,
    key_details_to_pb,
    key_to_pb,
    node_to_pb,
    policy_to_pb,
    to_us,
)
from kbs.config import KbsConfig
from kbs.context import BrokerContext
from kbs.masterkey import master_keyring
from kbs.status import status_code
from kbs.tls import load_credentials
from keylease.api.v1 import admin_pb2 as pb
from keylease.api.v1 import admin_pb2_grpc as pb_grpc
from keylease.api.v1.limits import MAX_ADMIN_REPLY, MAX_ADMIN_REQUEST

__all__ = ["AdminServer", "AdminService", "start_admin_server"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Ctx = grpc.aio.ServicerContext[object, object]
MAX_CONCURRENT_RPCS = 16


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(self, ctx: BrokerContext, ca_pem: bytes) -> None:
        self._ctx = ctx
        self._ca_pem = ca_pem

    def _authorize(self, context: Ctx) -> str:
        """The operator's name, or AdminAccessDenied (an unreadable ``admin_certs`` refuses
        every certificate)."""
        chain = list(context.auth_context().get("x509_pem_cert", []))
        cfg, store = self._ctx.config, self._ctx.store
        try:
            return verify_admin_cert(chain, self._ca_pem, cfg.admin_certs, store, self._ctx.clock())
        except e.ConfigError as exc:
            raise e.AdminAccessDenied(exc.diagnostics()) from None

    async def _run(self, context: Ctx, rpc: str, action: Callable[[LocalOperator], T]) -> T:
        try:
            name = await asyncio.to_thread(self._authorize, context)
        except e.AdminAccessDenied as exc:
            log.warning("admin %s refused: %s", rpc, exc)
            await context.abort(status_code(exc), exc.diagnostics())
            raise  # unreachable: abort raises
        cfg = self._ctx.config
        admin = Admin(store=self._ctx.store, actor=f"operator:{name}", clock=self._ctx.clock)
        signing = self._ctx.signing
        operator = LocalOperator(admin, master=lambda: master_keyring(cfg), signing=lambda: signing)
        try:
            result = await asyncio.to_thread(action, operator)
        except e.KbsError as exc:
            log.info("admin %s by operator:%s: %s", rpc, name, type(exc).__name__)
            await context.abort(status_code(exc), exc.diagnostics())
            raise  # unreachable: abort raises
        log.info("admin %s by operator:%s: ok", rpc, name)
        return result

    async def ListNodes(self, request: pb.AdminEmpty, context: Ctx) -> pb.AdminNodeList:
        nodes = await self._run(context, "ListNodes", lambda op: op.list_nodes())
        return pb.AdminNodeList(nodes=[node_to_pb(n) for n in nodes])

    async def ShowNode(self, request: pb.AdminNodeRequest, context: Ctx) -> pb.AdminNode:
        return node_to_pb(
            await self._run(context, "ShowNode", lambda op: op.get_node(request.name))
        )

    async def ApproveNode(self, request: pb.AdminApproveRequest, context: Ctx) -> pb.AdminNode:
        labels = dict(request.labels)
        node = await self._run(
            context, "ApproveNode", lambda op: op.approve_node(request.name, labels)
        )
        return node_to_pb(node)

    async def RevokeNode(self, request: pb.AdminNodeRequest, context: Ctx) -> pb.AdminNode:
        return node_to_pb(
            await self._run(context, "RevokeNode", lambda op: op.revoke_node(request.name))
        )

    async def AllowEk(
        self, request: pb.AdminAllowEkRequest, context: Ctx
    ) -> pb.AdminAllowEkResponse:
        added = await self._run(context, "AllowEk", lambda op: op.allow_ek(request.ek_hash))
        return pb.AdminAllowEkResponse(added=added)

    async def ListAllowlist(self, request: pb.AdminEmpty, context: Ctx) -> pb.AdminAllowlist:
        entries = await self._run(context, "ListAllowlist", lambda op: op.list_allowlist())
        return pb.AdminAllowlist(
            entries=[pb.AdminAllowlistEntry(ek_hash=h, added_at_us=to_us(at)) for h, at in entries]
        )

    async def ImportKey(self, request: pb.AdminKeyMaterial, context: Ctx) -> pb.AdminKey:
        data, source = request.private_key, request.source or "the uploaded key"
        key = await self._run(
            context, "ImportKey", lambda op: op.import_key(request.name, data, source)
        )
        return key_to_pb(key)

    async def RotateKey(self, request: pb.AdminKeyMaterial, context: Ctx) -> pb.AdminKey:
        data, source = request.private_key, request.source or "the uploaded key"
        key = await self._run(
            context, "RotateKey", lambda op: op.rotate_key(request.name, data, source)
        )
        return key_to_pb(key)

    async def DeleteKey(self, request: pb.AdminKeyName, context: Ctx) -> pb.AdminDeleteKeyResponse:
        deleted = await self._run(context, "DeleteKey", lambda op: op.delete_key(request.name))
        return pb.AdminDeleteKeyResponse(
            versions=deleted.versions, grants=deleted.grants, nodes_notified=deleted.nodes_notified
        )

    async def ListKeys(self, request: pb.AdminEmpty, context: Ctx) -> pb.AdminKeyList:
        keys = await self._run(context, "ListKeys", lambda op: op.list_keys())
        return pb.AdminKeyList(keys=[key_to_pb(k) for k in keys])

    async def RetireKey(
        self, request: pb.AdminRetireKeyRequest, context: Ctx
    ) -> pb.AdminRetireKeyResponse:
        retired = await self._run(
            context, "RetireKey", lambda op: op.retire_key(request.name, request.version)
        )
        return pb.AdminRetireKeyResponse(
            key=key_to_pb(retired.key), nodes_notified=retired.nodes_notified
        )

    async def ShowKey(self, request: pb.AdminKeyName, context: Ctx) -> pb.AdminKeyDetails:
        details = await self._run(context, "ShowKey", lambda op: op.show_key(request.name))
        return key_details_to_pb(details)

    async def AddGrant(self, request: pb.AdminGrantRequest, context: Ctx) -> pb.AdminGrant:
        selector = dict(request.selector)
        grant = await self._run(context, "AddGrant", lambda op: op.add_grant(request.key, selector))
        return grant_to_pb(grant)

    async def RemoveGrant(self, request: pb.AdminGrantRequest, context: Ctx) -> pb.AdminEmpty:
        selector = dict(request.selector)
        await self._run(context, "RemoveGrant", lambda op: op.remove_grant(request.key, selector))
        return pb.AdminEmpty()

    async def ListGrants(self, request: pb.AdminEmpty, context: Ctx) -> pb.AdminGrantList:
        grants = await self._run(context, "ListGrants", lambda op: op.list_grants())
        return pb.AdminGrantList(grants=[grant_to_pb(g) for g in grants])

    async def SetPolicy(self, request: pb.AdminSetPolicyRequest, context: Ctx) -> pb.AdminPolicy:
        pcrs, node, bank = list(request.pcrs), request.from_node or None, request.bank or "sha256"
        policy = await self._run(
            context, "SetPolicy", lambda op: op.set_policy(request.name, pcrs, node, bank)
        )
        return policy_to_pb(policy)

    async def AssignPolicy(
        self, request: pb.AdminAssignPolicyRequest, context: Ctx
    ) -> pb.AdminPolicy:
        selector = dict(request.selector)
        policy = await self._run(
            context, "AssignPolicy", lambda op: op.assign_policy(request.name, selector)
        )
        return policy_to_pb(policy)

    async def UnassignPolicy(
        self, request: pb.AdminAssignPolicyRequest, context: Ctx
    ) -> pb.AdminEmpty:
        selector = dict(request.selector)
        await self._run(
            context, "UnassignPolicy", lambda op: op.unassign_policy(request.name, selector)
        )
        return pb.AdminEmpty()

    async def ShowNodeBoot(self, request: pb.AdminNodeRequest, context: Ctx) -> pb.AdminBootRecord:
        return boot_to_pb(
            await self._run(context, "ShowNodeBoot", lambda op: op.node_boot(request.name))
        )

    async def LearnPolicy(
        self, request: pb.AdminLearnPolicyRequest, context: Ctx
    ) -> pb.AdminPolicyChange:
        pcrs, bank = list(request.pcrs), request.bank or "sha256"
        change = await self._run(
            context,
            "LearnPolicy",
            lambda op: op.learn_policy(request.name, request.from_node, bank, pcrs),
        )
        return _change_to_pb(change)

    async def AllowPolicy(
        self, request: pb.AdminAllowPolicyRequest, context: Ctx
    ) -> pb.AdminPolicyChange:
        components = list(request.components)
        change = await self._run(
            context,
            "AllowPolicy",
            lambda op: op.allow_policy(request.name, request.from_node, components),
        )
        return _change_to_pb(change)

    async def ShowPolicy(self, request: pb.AdminPolicyName, context: Ctx) -> pb.AdminPolicy:
        return policy_to_pb(
            await self._run(context, "ShowPolicy", lambda op: op.get_policy(request.name))
        )

    async def DiffPolicy(
        self, request: pb.AdminDiffPolicyRequest, context: Ctx
    ) -> pb.AdminPolicyDiff:
        rows = await self._run(
            context, "DiffPolicy", lambda op: op.diff_policy(request.name, request.node)
        )
        return diff_to_pb(rows)

    async def ApplyPolicy(
        self, request: pb.AdminApplyPolicyRequest, context: Ctx
    ) -> pb.AdminPolicyChange:
        data, source = request.document, request.source or "the uploaded policy file"
        change = await self._run(context, "ApplyPolicy", lambda op: op.apply_policy(data, source))
        return _change_to_pb(change)

    async def ListPolicies(self, request: pb.AdminEmpty, context: Ctx) -> pb.AdminPolicyList:
        policies = await self._run(context, "ListPolicies", lambda op: op.list_policies())
        return pb.AdminPolicyList(policies=[policy_to_pb(p) for p in policies])

    async def ListAudit(self, request: pb.AdminAuditRequest, context: Ctx) -> pb.AdminAuditList:
        node = request.node if request.HasField("node") else None
        entries = await self._run(
            context, "ListAudit", lambda op: op.list_audit(node, request.limit)
        )
        return pb.AdminAuditList(entries=[audit_to_pb(e) for e in entries])


class AdminServer:
    """A started admin listener; ``port`` is the bound port."""

    def __init__(self, server: grpc.aio.Server, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)


async def start_admin_server(cfg: KbsConfig, ctx: BrokerContext) -> AdminServer | None:
    """Start the admin API on ``admin_listen`` (None when it is turned off); ConfigError if the
    address cannot be bound or a TLS file is unusable."""
    if cfg.admin_listen is None:
        return None
    tls = load_credentials(cfg.tls_cert, cfg.tls_key)
    ca_pem = load_admin_ca(cfg)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_ADMIN_REQUEST),
            ("grpc.max_send_message_length", MAX_ADMIN_REPLY),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    pb_grpc.add_AdminServiceServicer_to_server(AdminService(ctx, ca_pem), server)
    host, port = cfg.admin_listen
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    creds = grpc.ssl_server_credentials(
        [(tls.key_pem, tls.chain_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    try:
        bound = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        raise e.ConfigError(
            f"cannot listen on admin_listen {address}: {exc}; another broker may be using it "
            '(set admin_listen to another port, or "" to turn the admin API off)'
        ) from exc
    await server.start()
    log.info("keylease-kbs admin API (mutual TLS) on %s:%d", host, bound)
    return AdminServer(server, host, bound)


def _change_to_pb(change: PolicyChange) -> pb.AdminPolicyChange:
    return pb.AdminPolicyChange(policy=policy_to_pb(change.policy), changes=list(change.changes))

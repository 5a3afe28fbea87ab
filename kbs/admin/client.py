"""The operator's side of the admin API: ``RemoteOperator`` (the ``kbs.admin.operator.Operator``
interface over gRPC with mutual TLS) and the client profiles file.

An admin certificate directory (``keylease-kbs admin-cert issue NAME --out DIR``) holds
``admin.pem``, ``admin-key.pem`` (0600) and ``ca.pem`` (the broker's CA, to verify the broker).
Profiles (``--profile NAME``) live in ``~/.config/keylease/kbs-client.toml``::

    [profile.prod]
    server = "kbs.example.net:8444"
    admin_cert = "/home/alice/.config/keylease/prod-admin"   # relative: to this file

gRPC errors become ``KbsError``s here, in one place: refused credentials ``ConfigError`` (exit
2), arguments the broker cannot carry out ``OperatorError`` / ``NotFound`` (exit 2), anything
else ``AdminUnavailable`` (exit 1).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc
from cryptography import x509

from kbs.admin.certs import CA_FILE, CERT_FILE, KEY_FILE
from kbs.admin.policies import PolicyChange
from kbs.admin.wire import (
    audit_from_pb,
    boot_from_pb,
    diff_from_pb,
    from_us,
    grant_from_pb,
    key_details_from_pb,
    key_from_pb,
    node_from_pb,
    policy_from_pb,
)
from kbs.config import parse_listen
from kbs.errors import AdminUnavailable, ConfigError, KbsError, NotFound, OperatorError
from kbs.model import (
    AuditEntry,
    BootRecord,
    DeletedKey,
    Grant,
    KeyDetails,
    Node,
    Policy,
    RetiredKey,
    StoredKey,
)
from kbs.policy.learn import DiffRow
from keylease.api.v1 import admin_pb2 as pb
from keylease.api.v1 import admin_pb2_grpc as pb_grpc
from keylease.api.v1.limits import MAX_ADMIN_REPLY
from keylease.certificates import MALFORMED
from keylease.tomlfile import read_toml

__all__ = ["AdminCredentials", "RemoteOperator", "load_profile"]

T = TypeVar("T")
RPC_TIMEOUT = 30.0


@dataclass(frozen=True)
class AdminCredentials:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @classmethod
    def load(cls, directory: Path, now: datetime) -> AdminCredentials:
        """Read an admin certificate directory; ConfigError if a file is missing, the key is
        readable by others, or the certificate is expired."""
        data = {}
        for name in (CERT_FILE, KEY_FILE, CA_FILE):
            path = directory / name
            try:
                with path.open("rb") as f:
                    data[name] = f.read(1 << 20)
                    mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            except OSError as exc:
                raise ConfigError(
                    f"cannot read {path}: {exc.strerror}; --admin-cert names the directory "
                    "`keylease-kbs admin-cert issue NAME --out DIR` wrote"
                ) from None
            if name == KEY_FILE and mode & 0o077:
                raise ConfigError(f"{path} is readable by other users; run `chmod 600 {path}`")
        try:
            cert = x509.load_pem_x509_certificate(data[CERT_FILE])
        except MALFORMED:
            raise ConfigError(f"{directory / CERT_FILE} is not a PEM certificate") from None
        if cert.not_valid_after_utc < now:
            raise ConfigError(
                f"admin certificate {directory / CERT_FILE} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; ask for a new one "
                "(`keylease-kbs admin-cert issue`)"
            )
        return cls(data[CERT_FILE], data[KEY_FILE], data[CA_FILE])


def load_profile(path: Path, name: str) -> tuple[str, Path]:
    """(server, admin certificate directory) of profile ``name`` in ``path``."""
    raw = read_toml(
        path, ConfigError, missing_hint="write it (README: Remote administration) or pass --server"
    )
    profiles = raw.get("profile", {})
    entry = profiles.get(name) if isinstance(profiles, dict) else None
    if not isinstance(entry, dict):
        known = ", ".join(sorted(profiles)) if isinstance(profiles, dict) else ""
        raise ConfigError(f"{path} has no [profile.{name}] (profiles: {known or 'none'})")
    server, cert = entry.get("server"), entry.get("admin_cert")
    if (
        not isinstance(server, str)
        or not isinstance(cert, str)
        or set(entry)
        - {
            "server",
            "admin_cert",
        }
    ):
        raise ConfigError(
            f'{path}: [profile.{name}] needs exactly server = "HOST:PORT" and admin_cert = "DIR"'
        )
    parse_listen(server, f"{path}: [profile.{name}] server")
    directory = Path(cert).expanduser()
    return server, directory if directory.is_absolute() else path.parent / directory


def _translate(server: str, exc: grpc.RpcError) -> KbsError:
    code_fn, details_fn = getattr(exc, "code", None), getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else None
    if not isinstance(details, str) or not details:
        details = code.name
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return ConfigError(f"the broker at {server} refused this admin certificate: {details}")
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return OperatorError(details)
    if code is grpc.StatusCode.UNAVAILABLE:
        return AdminUnavailable(
            f"cannot reach the admin API at {server} ({details}); check --server (the broker's "
            "admin_listen) and that the admin certificate is valid, not revoked and issued by "
            "this broker's CA"
        )
    return AdminUnavailable(f"the admin API at {server} failed: {code.name}: {details}")


class RemoteOperator:
    """``kbs.admin.operator.Operator`` over the admin API. Use as a context manager."""

    def __init__(self, server: str, creds: AdminCredentials) -> None:
        parse_listen(server, "--server")
        self._server = server
        channel_creds = grpc.ssl_channel_credentials(
            root_certificates=creds.ca_pem,
            private_key=creds.key_pem,
            certificate_chain=creds.cert_pem,
        )
        self._channel = grpc.secure_channel(
            server, channel_creds, options=[("grpc.max_receive_message_length", MAX_ADMIN_REPLY)]
        )
        self._stub = pb_grpc.AdminServiceStub(self._channel)

    def _call(self, rpc: Callable[..., T], request: object) -> T:
        try:
            return rpc(request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            raise _translate(self._server, exc) from None

    def list_nodes(self) -> list[Node]:
        reply = self._call(self._stub.ListNodes, pb.AdminEmpty())
        return [node_from_pb(n) for n in reply.nodes]

    def get_node(self, name: str) -> Node:
        return node_from_pb(self._call(self._stub.ShowNode, pb.AdminNodeRequest(name=name)))

    def approve_node(self, name: str, labels: Mapping[str, str]) -> Node:
        request = pb.AdminApproveRequest(name=name, labels=dict(labels))
        return node_from_pb(self._call(self._stub.ApproveNode, request))

    def revoke_node(self, name: str) -> Node:
        return node_from_pb(self._call(self._stub.RevokeNode, pb.AdminNodeRequest(name=name)))

    def allow_ek(self, ek_hash: str) -> bool:
        reply = self._call(self._stub.AllowEk, pb.AdminAllowEkRequest(ek_hash=ek_hash))
        return bool(reply.added)

    def list_allowlist(self) -> list[tuple[str, datetime]]:
        reply = self._call(self._stub.ListAllowlist, pb.AdminEmpty())
        return [(e.ek_hash, from_us(e.added_at_us)) for e in reply.entries]

    def import_key(self, name: str, data: bytes, source: str) -> StoredKey:
        request = pb.AdminKeyMaterial(name=name, private_key=data, source=source)
        return key_from_pb(self._call(self._stub.ImportKey, request))

    def rotate_key(self, name: str, data: bytes, source: str) -> StoredKey:
        request = pb.AdminKeyMaterial(name=name, private_key=data, source=source)
        return key_from_pb(self._call(self._stub.RotateKey, request))

    def delete_key(self, name: str) -> DeletedKey:
        reply = self._call(self._stub.DeleteKey, pb.AdminKeyName(name=name))
        return DeletedKey(name, reply.versions, reply.grants, tuple(reply.nodes_notified))

    def list_keys(self) -> list[StoredKey]:
        return [key_from_pb(k) for k in self._call(self._stub.ListKeys, pb.AdminEmpty()).keys]

    def retire_key(self, name: str, version: int) -> RetiredKey:
        request = pb.AdminRetireKeyRequest(name=name, version=version)
        reply = self._call(self._stub.RetireKey, request)
        return RetiredKey(key_from_pb(reply.key), tuple(reply.nodes_notified))

    def show_key(self, name: str) -> KeyDetails:
        return key_details_from_pb(self._call(self._stub.ShowKey, pb.AdminKeyName(name=name)))

    def add_grant(self, key: str, selector: Mapping[str, str]) -> Grant:
        request = pb.AdminGrantRequest(key=key, selector=dict(selector))
        return grant_from_pb(self._call(self._stub.AddGrant, request))

    def remove_grant(self, key: str, selector: Mapping[str, str]) -> None:
        self._call(self._stub.RemoveGrant, pb.AdminGrantRequest(key=key, selector=dict(selector)))

    def list_grants(self) -> list[Grant]:
        reply = self._call(self._stub.ListGrants, pb.AdminEmpty())
        return [grant_from_pb(g) for g in reply.grants]

    def set_policy(
        self, name: str, pcrs: Sequence[int], from_node: str | None, bank: str
    ) -> Policy:
        request = pb.AdminSetPolicyRequest(
            name=name, pcrs=list(pcrs), from_node=from_node or "", bank=bank
        )
        return policy_from_pb(self._call(self._stub.SetPolicy, request))

    def assign_policy(self, name: str, selector: Mapping[str, str]) -> Policy:
        request = pb.AdminAssignPolicyRequest(name=name, selector=dict(selector))
        return policy_from_pb(self._call(self._stub.AssignPolicy, request))

    def unassign_policy(self, name: str, selector: Mapping[str, str]) -> None:
        request = pb.AdminAssignPolicyRequest(name=name, selector=dict(selector))
        self._call(self._stub.UnassignPolicy, request)

    def list_policies(self) -> list[Policy]:
        reply = self._call(self._stub.ListPolicies, pb.AdminEmpty())
        return [policy_from_pb(p) for p in reply.policies]

    def node_boot(self, name: str) -> BootRecord | None:
        return boot_from_pb(self._call(self._stub.ShowNodeBoot, pb.AdminNodeRequest(name=name)))

    def _change(self, reply: pb.AdminPolicyChange) -> PolicyChange:
        return PolicyChange(policy_from_pb(reply.policy), tuple(reply.changes))

    def learn_policy(
        self, name: str, from_node: str, bank: str, pcrs: Sequence[int]
    ) -> PolicyChange:
        request = pb.AdminLearnPolicyRequest(
            name=name, from_node=from_node, bank=bank, pcrs=list(pcrs)
        )
        return self._change(self._call(self._stub.LearnPolicy, request))

    def allow_policy(self, name: str, from_node: str, components: Sequence[str]) -> PolicyChange:
        request = pb.AdminAllowPolicyRequest(
            name=name, from_node=from_node, components=list(components)
        )
        return self._change(self._call(self._stub.AllowPolicy, request))

    def get_policy(self, name: str) -> Policy:
        return policy_from_pb(self._call(self._stub.ShowPolicy, pb.AdminPolicyName(name=name)))

    def diff_policy(self, name: str, node: str) -> list[DiffRow]:
        request = pb.AdminDiffPolicyRequest(name=name, node=node)
        return diff_from_pb(self._call(self._stub.DiffPolicy, request))

    def apply_policy(self, data: bytes, source: str) -> PolicyChange:
        request = pb.AdminApplyPolicyRequest(document=data, source=source)
        return self._change(self._call(self._stub.ApplyPolicy, request))

    def list_audit(self, node: str | None, limit: int) -> list[AuditEntry]:
        request = pb.AdminAuditRequest(limit=max(limit, 0))
        if node is not None:
            request.node = node
        reply = self._call(self._stub.ListAudit, request)
        return [audit_from_pb(e) for e in reply.entries]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""The operator commands (``node``, ``allowlist``, ``key``, ``grant``, ``policy``, ``audit``):
each reads parsed arguments, calls the operator interface, prints.

They go through ``kbs.admin.operator.Operator``: by default ``LocalOperator`` on the database
the config names (the broker may be running; the database handles concurrent use, and the
master key is read only for ``key import`` and ``key rotate``); with ``--server`` /
``--admin-cert`` or ``--profile``, ``kbs.admin.client.RemoteOperator`` on a broker's admin API.
The release-signing keys are read only when a policy change widens what nodes may boot (its
approvals are signed for every node it concerns).
Both return the same values, so the output is the same.
"""

from __future__ import annotations

import argparse
import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from kbs.admin.actions import Admin
from kbs.admin.client import AdminCredentials, RemoteOperator, load_profile
from kbs.admin.keyimport import MAX_KEY_FILE_BYTES
from kbs.admin.operator import LocalOperator, Operator
from kbs.cli.output import (
    audit_json,
    audit_rows,
    dump_json,
    grant_json,
    key_details,
    key_details_json,
    key_json,
    key_rows,
    node_details,
    node_json,
    node_rows,
    render_table,
)
from kbs.cli.parser import Handler
from kbs.config import load_config
from kbs.errors import OperatorError
from kbs.masterkey import master_keyring
from kbs.model import format_selector, parse_labels, parse_selector
from kbs.signing import load_signing_keys
from kbs.store import Store

__all__ = ["COMMANDS", "actor", "now", "operator_session", "print_json_or"]


def now() -> datetime:
    return datetime.now(UTC)


def actor() -> str:
    """The audit actor of a local operator command: ``operator:<unix user>``."""
    uid = os.geteuid()
    try:
        return f"operator:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"operator:uid{uid}"


@contextmanager
def operator_session(args: argparse.Namespace) -> Iterator[Operator]:
    """The operator interface: remote with --server/--admin-cert or --profile, else local."""
    server, cert_dir = args.server, args.admin_cert
    if args.profile is not None:
        if server is not None or cert_dir is not None:
            raise OperatorError("give either --profile or --server with --admin-cert, not both")
        server, cert_dir = load_profile(args.profiles_file, args.profile)
    if server is not None or cert_dir is not None:
        if server is None or cert_dir is None:
            raise OperatorError(
                "a remote broker needs both --server HOST:PORT and --admin-cert DIR"
            )
        with RemoteOperator(server, AdminCredentials.load(cert_dir, now())) as remote:
            yield remote
        return
    cfg = load_config(args.config)
    with Store.open(cfg.database) as store:
        admin = Admin(store=store, actor=actor(), clock=now)
        yield LocalOperator(
            admin, master=lambda: master_keyring(cfg), signing=lambda: load_signing_keys(cfg)
        )


def print_json_or(args: argparse.Namespace, value: object, text: str) -> int:
    print(dump_json(value) if args.json else text)
    return 0


# --- nodes and allowlist ----------------------------------------------------------------------


def cmd_node_list(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        nodes = admin.list_nodes()
    return print_json_or(args, [node_json(n) for n in nodes], node_rows(nodes))


def cmd_node_show(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        node = admin.get_node(args.node)
        boot = admin.node_boot(node.name)
    return print_json_or(args, node_json(node, boot), node_details(node, boot))


def cmd_node_approve(args: argparse.Namespace) -> int:
    labels = parse_labels(args.label or [])
    with operator_session(args) as admin:
        node = admin.approve_node(args.node, labels)
    print(f"node {node.name}: approved, labels {format_selector(node.labels) or 'none'}")
    if not node.labels:
        print("note: a node without labels matches no grant and no policy; add --label k=v")
    return 0


def cmd_node_revoke(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        node = admin.revoke_node(args.node)
    print(
        f"node {node.name}: revoked; its next attestation is denied and its agent removes its keys"
    )
    return 0


def cmd_allowlist_add(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        added = admin.allow_ek(args.ek_hash)
    print(f"EK {args.ek_hash.strip().lower()}: {'added' if added else 'already on the allowlist'}")
    return 0


def cmd_allowlist_list(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        entries = admin.list_allowlist()
    rows = [[h, at.isoformat(timespec="seconds")] for h, at in entries]
    return print_json_or(
        args,
        [{"ek_hash": h, "added_at": at} for h, at in rows],
        render_table(["EK_HASH", "ADDED_AT"], rows),
    )


# --- keys and grants --------------------------------------------------------------------------


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise OperatorError(f"cannot read --private-key {path}: {exc.strerror}") from None


def cmd_key_import(args: argparse.Namespace) -> int:
    data = _read_key_file(args.private_key)
    with operator_session(args) as admin:
        key = admin.import_key(args.name, data, str(args.private_key))
    print(f"key {key.name}: imported version {key.version} ({key.algorithm})")
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    data = _read_key_file(args.private_key)
    with operator_session(args) as admin:
        key = admin.rotate_key(args.name, data, str(args.private_key))
    print(
        f"key {key.name}: version {key.version} ({key.algorithm}) is now current: encrypt new "
        "images to it. Granted nodes are told to attest again and install it beside the older "
        "versions, which stay released so that older images still pull; stop releasing one "
        f"with `keylease-kbs key retire {key.name} --version N`"
    )
    return 0


def cmd_key_retire(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        retired = admin.retire_key(args.name, args.version)
    print(
        f"key {retired.key.name}: version {retired.key.version} retired: no longer released; "
        f"{len(retired.nodes_notified)} node(s) told to attest again and remove its file "
        "(images encrypted only to it no longer pull there)"
    )
    return 0


def cmd_key_delete(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        deleted = admin.delete_key(args.name)
    print(
        f"key {deleted.name}: deleted ({deleted.versions} version(s), {deleted.grants} grant(s)); "
        f"{len(deleted.nodes_notified)} node(s) told to attest again and drop it"
    )
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        keys = admin.list_keys()
    return print_json_or(args, [key_json(k) for k in keys], key_rows(keys))


def cmd_key_show(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        details = admin.show_key(args.name)
    return print_json_or(args, key_details_json(details), key_details(details))


def cmd_grant_add(args: argparse.Namespace) -> int:
    selector = parse_selector(args.selector)
    with operator_session(args) as admin:
        grant = admin.add_grant(args.key, selector)
    print(f"key {grant.key_name}: granted to nodes labelled {format_selector(grant.selector)}")
    return 0


def cmd_grant_remove(args: argparse.Namespace) -> int:
    selector = parse_selector(args.selector)
    with operator_session(args) as admin:
        admin.remove_grant(args.key, selector)
    print(
        f"key {args.key}: grant to {format_selector(selector)} removed; matching nodes are told "
        "to attest again and drop the key unless another grant still covers them"
    )
    return 0


def cmd_grant_list(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        grants = admin.list_grants()
    rows = [[g.key_name, format_selector(g.selector), g.created_at.isoformat(timespec="seconds")]
            for g in grants]  # fmt: skip
    return print_json_or(
        args,
        [grant_json(g) for g in grants],
        render_table(["KEY", "SELECTOR", "CREATED_AT"], rows),
    )


# --- audit --------------------------------------------------------------------------------------


def cmd_audit(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise OperatorError("--limit must be at least 1")
    with operator_session(args) as admin:
        entries = admin.list_audit(args.node, args.limit)
    return print_json_or(args, [audit_json(e) for e in entries], audit_rows(entries))


COMMANDS: dict[str, Handler] = {
    "node list": cmd_node_list,
    "node show": cmd_node_show,
    "node approve": cmd_node_approve,
    "node revoke": cmd_node_revoke,
    "allowlist add": cmd_allowlist_add,
    "allowlist list": cmd_allowlist_list,
    "key import": cmd_key_import,
    "key rotate": cmd_key_rotate,
    "key retire": cmd_key_retire,
    "key delete": cmd_key_delete,
    "key list": cmd_key_list,
    "key show": cmd_key_show,
    "grant add": cmd_grant_add,
    "grant remove": cmd_grant_remove,
    "grant list": cmd_grant_list,
    "audit": cmd_audit,
}

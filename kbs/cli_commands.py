"""The ``keylease-kbs`` subcommands: each reads parsed arguments, calls the domain, prints.

Operator commands open the database directly (the broker may be running: SQLite WAL handles
concurrent use) and read the master key only for ``key import`` and ``key rotate``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from kbs.admin import Admin, parse_pcr_list
from kbs.cli_init import init_broker
from kbs.cli_output import (
    audit_json,
    audit_rows,
    dump_json,
    grant_json,
    key_json,
    node_details,
    node_json,
    node_rows,
    policy_json,
    render_table,
)
from kbs.config import EnrollmentMode, KbsConfig, check_files, load_config, read_master_key
from kbs.errors import NotFound, OperatorError
from kbs.keyimport import MAX_KEY_FILE_BYTES
from kbs.masterkey import MasterKey
from kbs.model import format_selector, parse_labels, parse_selector
from kbs.store import Store

__all__ = ["COMMANDS", "Handler"]

log = logging.getLogger("kbs.cli")

Handler = Callable[[argparse.Namespace], int]


def _now() -> datetime:
    return datetime.now(UTC)


def _actor() -> str:
    uid = os.geteuid()
    try:
        return f"operator:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"operator:uid{uid}"


@contextmanager
def _admin(args: argparse.Namespace) -> Iterator[tuple[KbsConfig, Admin]]:
    cfg = load_config(args.config)
    with Store.open(cfg.database) as store:
        yield cfg, Admin(store=store, actor=_actor(), clock=_now)


def _print_json_or(args: argparse.Namespace, value: object, text: str) -> int:
    print(dump_json(value) if args.json else text)
    return 0


# --- broker lifecycle -------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    result = init_broker(
        args.directory,
        listen=args.listen,
        ek_roots=args.ek_roots,
        enrollment=EnrollmentMode(args.enrollment),
    )
    directory = result.config.parent
    print(f"wrote {result.config}, {directory / 'master.key'} (0600), {directory / 'tls'}/,")
    print(
        f"  {result.agent_ca}"
        + (f", {directory / 'ek-roots.pem'}" if result.ek_roots_copied else "")
    )
    print("keep master.key secret and backed up: it encrypts every stored image key")
    for note in result.notes:
        print(f"note: {note}")
    print(f"next: keylease-kbs --config {result.config} check-config")
    print("agent config lines (copy agent-ca.pem to each node):")
    print(f'kbs = "{result.agent_kbs}"')
    print(f'kbs_ca = "{result.agent_ca}"')
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for line in check_files(cfg):
        print(line)
    print("ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for line in check_files(cfg):
        log.debug("%s", line)
    # Imported here: only the server needs the TPM structure and gRPC service modules.
    from kbs.server import serve

    serve(cfg, args.ready_file)
    return 0


# --- nodes and allowlist ----------------------------------------------------------------------


def cmd_node_list(args: argparse.Namespace) -> int:
    with _admin(args) as (_, admin):
        nodes = admin.store.list_nodes()
    return _print_json_or(args, [node_json(n) for n in nodes], node_rows(nodes))


def cmd_node_show(args: argparse.Namespace) -> int:
    with _admin(args) as (_, admin):
        node = admin.store.get_node(args.node)
    if node is None:
        raise NotFound(f"no node named {args.node!r}; `keylease-kbs node list` shows the nodes")
    return _print_json_or(args, node_json(node), node_details(node))


def cmd_node_approve(args: argparse.Namespace) -> int:
    labels = parse_labels(args.label or [])
    with _admin(args) as (_, admin):
        node = admin.approve_node(args.node, labels)
    print(f"node {node.name}: approved, labels {format_selector(node.labels) or 'none'}")
    if not node.labels:
        print("note: a node without labels matches no grant and no policy; add --label k=v")
    return 0


def cmd_node_revoke(args: argparse.Namespace) -> int:
    with _admin(args) as (_, admin):
        node = admin.revoke_node(args.node)
    print(
        f"node {node.name}: revoked; its next attestation is denied and its agent removes its keys"
    )
    return 0


def cmd_allowlist_add(args: argparse.Namespace) -> int:
    with _admin(args) as (_, admin):
        added = admin.allow_ek(args.ek_hash)
    print(f"EK {args.ek_hash.strip().lower()}: {'added' if added else 'already on the allowlist'}")
    return 0


def cmd_allowlist_list(args: argparse.Namespace) -> int:
    with _admin(args) as (_, admin):
        entries = admin.store.list_allowlist()
    rows = [[h, at.isoformat(timespec="seconds")] for h, at in entries]
    return _print_json_or(
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
    with _admin(args) as (cfg, admin):
        master = MasterKey(read_master_key(cfg).reveal())
        key = admin.import_key(args.name, data, str(args.private_key), master)
    print(f"key {key.name}: imported version {key.version} ({key.algorithm})")
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    data = _read_key_file(args.private_key)
    with _admin(args) as (cfg, admin):
        master = MasterKey(read_master_key(cfg).reveal())
        key = admin.rotate_key(args.name, data, str(args.private_key), master)
    print(
        f"key {key.name}: version {key.version} ({key.algorithm}) is now released; granted "
        "nodes are told to attest again (older versions stay listed)"
    )
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    with _admin(args) as (_, admin):
        keys = admin.store.list_keys()
    rows = [[k.name, str(k.version), k.algorithm, k.created_at.isoformat(timespec="seconds")]
            for k in keys]  # fmt: skip
    return _print_json_or(
        args,
        [key_json(k) for k in keys],
        render_table(["NAME", "VERSION", "ALGORITHM", "CREATED_AT"], rows),
    )


def cmd_grant_add(args: argparse.Namespace) -> int:
    selector = parse_selector(args.selector)
    with _admin(args) as (_, admin):
        grant = admin.add_grant(args.key, selector)
    print(f"key {grant.key_name}: granted to nodes labelled {format_selector(grant.selector)}")
    return 0


def cmd_grant_remove(args: argparse.Namespace) -> int:
    selector = parse_selector(args.selector)
    with _admin(args) as (_, admin):
        admin.remove_grant(args.key, selector)
    print(
        f"key {args.key}: grant to {format_selector(selector)} removed; matching nodes are told "
        "to attest again and drop the key unless another grant still covers them"
    )
    return 0


def cmd_grant_list(args: argparse.Namespace) -> int:
    with _admin(args) as (_, admin):
        grants = admin.store.list_grants()
    rows = [[g.key_name, format_selector(g.selector), g.created_at.isoformat(timespec="seconds")]
            for g in grants]  # fmt: skip
    return _print_json_or(
        args,
        [grant_json(g) for g in grants],
        render_table(["KEY", "SELECTOR", "CREATED_AT"], rows),
    )


# --- policies and audit -----------------------------------------------------------------------


def cmd_policy_set(args: argparse.Namespace) -> int:
    pcrs = parse_pcr_list(args.pcrs)
    with _admin(args) as (_, admin):
        policy = admin.set_policy_from_node(args.name, pcrs, args.from_node, args.bank)
    indices = ",".join(str(i) for i in sorted(policy.pcrs))
    print(f"policy {policy.name}: {policy.pcr_bank} PCRs {indices} from node {args.from_node}")
    if not policy.selectors:
        print(f"note: assign it with `keylease-kbs policy assign {policy.name} --selector k=v`")
    return 0


def cmd_policy_assign(args: argparse.Namespace) -> int:
    selector = parse_selector(args.selector)
    with _admin(args) as (_, admin):
        policy = admin.assign_policy(args.name, selector)
    print(f"policy {policy.name}: assigned to nodes labelled {format_selector(selector)}")
    return 0


def cmd_policy_list(args: argparse.Namespace) -> int:
    with _admin(args) as (_, admin):
        policies = admin.store.list_policies()
    rows = [
        [
            p.name,
            p.pcr_bank,
            ",".join(str(i) for i in sorted(p.pcrs)),
            " ".join(format_selector(s) for s in p.selectors) or "-",
        ]
        for p in policies
    ]
    return _print_json_or(
        args,
        [policy_json(p) for p in policies],
        render_table(["NAME", "BANK", "PCRS", "SELECTORS"], rows),
    )


def cmd_audit(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise OperatorError("--limit must be at least 1")
    with _admin(args) as (_, admin):
        entries = admin.store.list_audit(node=args.node, limit=args.limit)
    return _print_json_or(args, [audit_json(e) for e in entries], audit_rows(entries))


COMMANDS: dict[str, Handler] = {
    "init": cmd_init,
    "check-config": cmd_check_config,
    "serve": cmd_serve,
    "node list": cmd_node_list,
    "node show": cmd_node_show,
    "node approve": cmd_node_approve,
    "node revoke": cmd_node_revoke,
    "allowlist add": cmd_allowlist_add,
    "allowlist list": cmd_allowlist_list,
    "key import": cmd_key_import,
    "key rotate": cmd_key_rotate,
    "key list": cmd_key_list,
    "grant add": cmd_grant_add,
    "grant remove": cmd_grant_remove,
    "grant list": cmd_grant_list,
    "policy set": cmd_policy_set,
    "policy assign": cmd_policy_assign,
    "policy list": cmd_policy_list,
    "audit": cmd_audit,
}

"""The ``policy`` commands: learn from a node, widen from a canary, show, diff against a node,
export to and apply from a reviewed file, assign; and ``policy set`` for raw PCR values.

Each goes through the operator interface (``kbs.cli.operator.operator_session``: the local
database, or a broker's admin API), like every other operator command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kbs.admin.actions import parse_pcr_list
from kbs.admin.policies import PolicyChange
from kbs.cli.operator import operator_session, print_json_or
from kbs.cli.output import diff_json, diff_rows, policy_details, policy_json, policy_rows
from kbs.cli.parser import Handler
from kbs.errors import OperatorError
from kbs.model import format_selector, parse_selector
from kbs.policy.policyfile import MAX_FILE, render

__all__ = ["COMMANDS"]


def _print_change(change: PolicyChange, what: str) -> None:
    policy = change.policy
    if not change.changes:
        print(f"policy {policy.name}: no change ({what})")
        return
    print(f"policy {policy.name} ({policy.pcr_bank}): {what}")
    for line in change.changes:
        print(f"  {line}")
    if not policy.selectors:
        print(f"note: assign it with `keylease-kbs policy assign {policy.name} --selector k=v`")


def cmd_policy_set(args: argparse.Namespace) -> int:
    pcrs = parse_pcr_list(args.pcrs)
    with operator_session(args) as admin:
        policy = admin.set_policy(args.name, pcrs, args.from_node, args.bank)
    indices = ",".join(str(i) for i in policy.document.pcrs)
    print(f"policy {policy.name}: {policy.pcr_bank} PCRs {indices} from node {args.from_node}")
    if not policy.selectors:
        print(f"note: assign it with `keylease-kbs policy assign {policy.name} --selector k=v`")
    return 0


def cmd_policy_learn(args: argparse.Namespace) -> int:
    pcrs = parse_pcr_list(args.pcrs) if args.pcrs else []
    with operator_session(args) as admin:
        change = admin.learn_policy(args.name, args.from_node, args.bank, pcrs)
    _print_change(change, f"learned from node {args.from_node}")
    return 0


def cmd_policy_allow(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        change = admin.allow_policy(args.name, args.from_node, args.component or [])
    _print_change(change, f"now also allows what node {args.from_node} shows")
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        policy = admin.get_policy(args.name)
    return print_json_or(args, policy_json(policy), policy_details(policy))


def cmd_policy_diff(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        rows = admin.diff_policy(args.name, args.node)
    print_json_or(args, diff_json(rows), diff_rows(rows))
    return 0


def cmd_policy_export(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        policy = admin.get_policy(args.name)
    text = render(policy)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        args.out.write_text(text)
    except OSError as exc:
        raise OperatorError(f"cannot write {args.out}: {exc.strerror}") from None
    print(f"policy {policy.name}: written to {args.out}")
    return 0


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(MAX_FILE + 1)
    except OSError as exc:
        raise OperatorError(f"cannot read policy file {path}: {exc.strerror}") from None


def cmd_policy_apply(args: argparse.Namespace) -> int:
    data = _read(args.file)
    with operator_session(args) as admin:
        change = admin.apply_policy(data, str(args.file))
    _print_change(change, f"applied {args.file}")
    return 0


def cmd_policy_assign(args: argparse.Namespace) -> int:
    selector = parse_selector(args.selector)
    with operator_session(args) as admin:
        policy = admin.assign_policy(args.name, selector)
    print(f"policy {policy.name}: assigned to nodes labelled {format_selector(selector)}")
    return 0


def cmd_policy_unassign(args: argparse.Namespace) -> int:
    selector = parse_selector(args.selector)
    with operator_session(args) as admin:
        admin.unassign_policy(args.name, selector)
    print(f"policy {args.name}: no longer assigned to {format_selector(selector)}")
    return 0


def cmd_policy_list(args: argparse.Namespace) -> int:
    with operator_session(args) as admin:
        policies = admin.list_policies()
    return print_json_or(args, [policy_json(p) for p in policies], policy_rows(policies))


COMMANDS: dict[str, Handler] = {
    "policy set": cmd_policy_set,
    "policy learn": cmd_policy_learn,
    "policy allow": cmd_policy_allow,
    "policy show": cmd_policy_show,
    "policy diff": cmd_policy_diff,
    "policy export": cmd_policy_export,
    "policy apply": cmd_policy_apply,
    "policy assign": cmd_policy_assign,
    "policy unassign": cmd_policy_unassign,
    "policy list": cmd_policy_list,
}

"""``keylease-kbs``'s arguments: every command, its options and its ``--help`` text.

Needs nothing of the broker extra, so that the parser is built before anything heavy loads.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from kbs.config import DEFAULT_CONFIG, EnrollmentMode

__all__ = ["LOCAL_ONLY", "Handler", "build_parser"]

Handler = Callable[[argparse.Namespace], int]

EPILOG = """Operator commands run on the local database, or on a remote broker's admin API with
--server HOST:PORT --admin-cert DIR (or --profile NAME from ~/.config/keylease/kbs-client.toml)."""

_GROUPS: dict[str, tuple[str, dict[str, str]]] = {
    "node": (
        "list, show, approve and revoke nodes",
        {
            "list": "nodes, state, labels, EK hash, last attestation",
            "show": "one node in detail, with its last attested PCR values",
            "approve": "approve a node and set its labels (labels come only from operators)",
            "revoke": "revoke a node: its agent is told at once and removes its keys",
        },
    ),
    "allowlist": (
        'EK hashes approved automatically with enrollment = "allowlist"',
        {"add": "pre-register an EK hash", "list": "registered EK hashes"},
    ),
    "key": (
        "image keys (stored encrypted under the master key)",
        {
            "import": "import a new key as version 1 (an existing NAME is refused)",
            "rotate": "make a new private key the current version of NAME (older ones stay "
            "released until retired)",
            "retire": "stop releasing one older version of NAME; nodes remove its file",
            "delete": "delete key NAME: every version and its grants; nodes drop it",
            "list": "stored keys, every version and its state (current, active, retired)",
            "show": "one key: its versions, grants, and which nodes hold which version",
        },
    ),
    "grant": (
        "which nodes receive which key",
        {
            "add": "release KEY to nodes whose labels match every pair",
            "remove": "remove the grant of KEY with exactly this selector",
            "list": "grants",
        },
    ),
    "policy": (
        "attestation policies: allowed values per boot component (every policy assigned to a "
        "node must pass)",
        {
            "learn": "make a node's last verified boot the policy (its components, or --pcrs)",
            "allow": "add what another node shows (the canary of an update) to a policy",
            "show": "a policy's components and their allowed values",
            "diff": "per component: what a node last showed, whether it passes, what is allowed",
            "export": "write a policy as a TOML file for review and version control",
            "apply": "make a policy exactly what a TOML file says (idempotent; prints the diff)",
            "set": "a policy of raw PCR values from a node's last verified attestation",
            "assign": "assign a policy to nodes whose labels match every pair",
            "unassign": "remove the assignment with exactly this selector",
            "list": "policies, their bank, PCRs, components and assignments",
        },
    ),
    "admin-cert": (
        "operator client certificates for the admin API (on the broker host)",
        {
            "issue": "issue an admin certificate from the broker's CA",
            "revoke": "revoke every admin certificate issued to NAME (takes effect at once)",
            "list": "issued admin certificates and their state",
        },
    ),
    "signing-key": (
        "the key that signs every release (on the broker host)",
        {"create": "create the release-signing key and its certificate from the broker's CA"},
    ),
    "master-key": (
        "the master key that encrypts stored image keys (on the broker host)",
        {
            "rotate": "make a new master key current and re-encrypt every stored key under it",
            "status": "configured master keys and how many key versions each still seals",
        },
    ),
}
# commands that need the broker host's files: refused with --server/--admin-cert/--profile
LOCAL_ONLY = ("init", "check-config", "serve", "admin-cert", "master-key", "signing-key")


def _profiles_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "keylease" / "kbs-client.toml"


def _key_version(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) < 2**32:
        raise argparse.ArgumentTypeError(f"invalid key version {text[:20]!r}: a number from 1")
    return int(text)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str,
         command: str) -> argparse.ArgumentParser:  # fmt: skip
    parser = sub.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".")
    parser.set_defaults(command=command)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keylease-kbs",
        description="keylease key broker: releases image keys to TPM-attested nodes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"kbs.toml (default {DEFAULT_CONFIG})"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    parser.add_argument(
        "--server", metavar="HOST:PORT", help="a remote broker's admin API (its admin_listen)"
    )
    parser.add_argument(
        "--admin-cert", type=Path, metavar="DIR",
        help="admin certificate directory from `admin-cert issue` (with --server)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", metavar="NAME",
        help="[profile.NAME] (server, admin_cert) from ~/.config/keylease/kbs-client.toml",
    )  # fmt: skip
    parser.set_defaults(profiles_file=_profiles_file())
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    init = _add(sub, "init", "create a broker directory: kbs.toml, TLS, master key", "init")
    init.add_argument("directory", type=Path, metavar="DIR")
    init.add_argument(
        "--listen", default="127.0.0.1:8443", metavar="HOST:PORT",
        help='address to serve on (default 127.0.0.1:8443; "[::]:8443" for IPv6)',
    )  # fmt: skip
    init.add_argument(
        "--ek-roots", type=Path, metavar="PEM",
        help="TPM-manufacturer root/intermediate bundle to copy to ek-roots.pem",
    )  # fmt: skip
    init.add_argument(
        "--enrollment", choices=[m.value for m in EnrollmentMode], default="manual",
        help="how enrolled nodes are approved (default manual)",
    )  # fmt: skip
    _add(sub, "check-config", "validate the config and open every file it names", "check-config")
    serve = _add(sub, "serve", "run the broker until SIGTERM/SIGINT", "serve")
    serve.add_argument(
        "--ready-file", type=Path, metavar="PATH",
        help='write "HOST:PORT" here once listening',
    )  # fmt: skip
    audit = _add(sub, "audit", "the audit log, oldest first", "audit")
    audit.add_argument("--node", metavar="N", help="only entries about node N")
    audit.add_argument("--limit", type=int, default=100, metavar="N", help="last N (default 100)")
    _json_flag(audit)

    for group, (text, commands) in _GROUPS.items():
        group_parser = sub.add_parser(group, help=text, description=text[:1].upper() + text[1:])
        actions = group_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        for action, action_text in commands.items():
            p = _add(actions, action, action_text, f"{group} {action}")
            if action in ("list", "show", "diff") and group != "master-key":
                _json_flag(p)
        _group_arguments(group, actions)
    return parser


def _group_arguments(
    group: str, actions: argparse._SubParsersAction[argparse.ArgumentParser]
) -> None:
    parsers = actions.choices
    if group == "node":
        for action in ("show", "approve", "revoke"):
            parsers[action].add_argument("node", metavar="NODE")
        parsers["approve"].add_argument(
            "--label", action="append", metavar="k=v", help="a label to set (repeatable)"
        )
    elif group == "allowlist":
        parsers["add"].add_argument("ek_hash", metavar="EK_HASH", help="SHA-256 hex of the EK")
    elif group == "key":
        for action in ("delete", "show", "retire"):
            parsers[action].add_argument("name", metavar="NAME")
        parsers["retire"].add_argument(
            "--version", type=_key_version, required=True, metavar="N",
            help="the version to retire (not the current one: rotate first)",
        )  # fmt: skip
        for action in ("import", "rotate"):
            parsers[action].add_argument("name", metavar="NAME")
            parsers[action].add_argument(
                "--private-key", type=Path, required=True, metavar="FILE",
                help="RSA >= 2048 or EC P-256/384/521; PKCS#8, PKCS#1, SEC1 (PEM or DER)",
            )  # fmt: skip
    elif group == "grant":
        for action in ("add", "remove"):
            parsers[action].add_argument("key", metavar="KEY")
            parsers[action].add_argument("--selector", required=True, metavar="k=v[,k=v]")
    elif group == "admin-cert":
        for action in ("issue", "revoke"):
            parsers[action].add_argument("name", metavar="NAME", help="the operator's name (CN)")
        parsers["issue"].add_argument(
            "--days", type=int, default=90, help="validity in days (default 90)"
        )
        parsers["issue"].add_argument(
            "--out", type=Path, required=True, metavar="DIR", help="directory to write to"
        )
    elif group == "signing-key":
        parsers["create"].add_argument(
            "--replace", action="store_true",
            help="replace the existing key and certificate (brokers sign with the new one from "
            "their next start; agents accept both)",
        )  # fmt: skip
    elif group == "master-key":
        how = parsers["rotate"].add_mutually_exclusive_group(required=True)
        how.add_argument(
            "--new-key", type=Path, metavar="FILE", help="32 random bytes, mode 0600 or 0400"
        )
        how.add_argument("--generate", action="store_true", help="write a new key next to kbs.toml")
    elif group == "policy":
        _policy_arguments(parsers)


def _policy_arguments(parsers: dict[str, argparse.ArgumentParser]) -> None:
    for action in ("learn", "allow", "show", "diff", "export", "set", "assign", "unassign"):
        parsers[action].add_argument("name", metavar="NAME")
    for action in ("learn", "allow"):
        parsers[action].add_argument(
            "--from-node", required=True, metavar="NODE",
            help="the node whose last verified attestation (and boot event log) to take",
        )  # fmt: skip
    parsers["learn"].add_argument(
        "--pcrs", metavar="0,1,...", help="PCRs to cover (default: every PCR its log extends)"
    )
    parsers["learn"].add_argument("--bank", default="sha256", help="PCR bank (default sha256)")
    parsers["allow"].add_argument(
        "--component", action="append", metavar="C",
        help="only this component (repeatable; e.g. boot-app.3, kernel-cmdline, db, pcr.10); "
        "default: every component the policy names",
    )  # fmt: skip
    parsers["diff"].add_argument("--node", required=True, metavar="NODE")
    parsers["export"].add_argument(
        "--out", type=Path, metavar="FILE", help="write here instead of standard output"
    )
    parsers["apply"].add_argument("file", type=Path, metavar="FILE", help="a policy TOML file")
    parsers["set"].add_argument(
        "--pcrs", required=True, metavar="0,1,...", help="PCR indices the policy covers"
    )
    parsers["set"].add_argument(
        "--from-node", metavar="NODE",
        help="take the values from this node's last verified attestation (required in v1)",
    )  # fmt: skip
    parsers["set"].add_argument("--bank", default="sha256", help="PCR bank (default sha256)")
    for action in ("assign", "unassign"):
        parsers[action].add_argument("--selector", required=True, metavar="k=v[,k=v]")

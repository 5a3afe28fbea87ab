"""keylease-agent command line. The only place that configures logging and reads the environment.

Exit codes: 0 keys installed; 1 unexpected error; 2 bad configuration or usage; 3 pending
operator approval; 4 attestation denied (keys removed); 5 enrollment refused (EK not trusted,
EK conflict, not allowlisted); 6 broker unreachable or broker error; 7 TPM unavailable or TPM
error; 8 release or key invalid; 9 key directory or state directory unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.config import DEFAULT_CONFIG, load_config
from agent.errors import AgentError
from agent.logsetup import journal_wanted, setup_logging
from keylease.extras import missing_extra
from keylease.hardening import harden_process

__all__ = ["EXTRA_MODULES", "main"]

# What `pip install 'keylease[agent]'` adds. main() checks for them before anything else, so every
# module that imports one of them is imported inside the command that needs it, never up here.
EXTRA_MODULES = ("tpm2_pytss", "systemd", "pyroute2")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keylease-agent",
        description="Attest this node's TPM to keylease-kbs and install the image keys it grants.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"agent config (default {DEFAULT_CONFIG})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    attest = sub.add_parser(
        "attest",
        help="enroll if needed, attest, and install the granted keys",
        description="Enroll if needed, attest the TPM, and install the granted keys.",
    )
    attest.add_argument(
        "--once", action="store_true", required=True, help="attest one time and exit"
    )
    attest.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.add_parser(
        "run",
        help="run as a daemon (systemd Type=notify): restore, attest, renew, follow revocations",
        description=(
            "Restore keys from the sealed cache, attest, renew the lease before it ends, follow "
            "the broker's revocations and key changes. SIGTERM stops (keys stay unless "
            "remove_keys_on_stop), SIGHUP reloads the configuration."
        ),
    )
    status = sub.add_parser(
        "status",
        help="show enrollment, lease, installed keys, approved boot states, last attestation",
        description=(
            "Show what the agent last did (from its state directory), the key files, and the "
            "approved boot states it holds with when each expires (TPM clock limit, and an "
            "estimate in wall time)."
        ),
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser(
        "check-config",
        help="validate the configuration and exit",
        description="Validate the configuration file and the files it names.",
    )
    return parser


def _run(config: Path) -> int:
    cfg = load_config(config)
    harden_process("keylease-agent")  # it holds image keys and the node key in memory
    from agent.daemon import Daemon
    from agent.notify import Notifier

    notifier = Notifier.from_environ(os.environ, os.getpid())
    return Daemon(config, cfg, notifier).run()


def _status(config: Path, as_json: bool) -> int:
    cfg = load_config(config)
    from agent.status_report import render_status, status_report

    report = status_report(cfg)
    print(json.dumps(report, indent=2) if as_json else render_status(report))
    return 0


def _attest(config: Path, as_json: bool) -> int:
    cfg = load_config(config)
    harden_process("keylease-agent")
    # Imported here so that TSS2_LOG (set in main) is in place before libtss2 loads.
    from agent.attest import attest_once
    from agent.broker import BrokerClient
    from agent.errors import AttestationDenied, PendingApproval
    from agent.state import StateDir
    from agent.status_report import record_once
    from agent.tpm import Tpm

    state = StateDir.open(cfg.state_dir)
    try:
        with Tpm.open(cfg.tcti) as tpm, BrokerClient(cfg) as client:
            report = attest_once(cfg, tpm, client, state)
    except AttestationDenied as exc:
        record_once(cfg, state, "denied", str(exc), None)
        raise
    except PendingApproval as exc:
        record_once(cfg, state, "pending", str(exc), None)
        raise
    except AgentError as exc:
        record_once(cfg, state, "error", str(exc), None)
        raise
    record_once(cfg, state, "ok", None, report.bundle, report.clock)
    if as_json:
        print(
            json.dumps(
                {
                    "node": report.node_name,
                    "result": "installed",
                    "not_after": report.bundle.not_after.isoformat(),
                    "keys": [{"name": k.name, "version": k.version} for k in report.bundle.keys],
                    "files": list(report.installed),
                    "removed": list(report.removed),
                },
                indent=2,
            )
        )
    else:
        print(
            f"node {report.node_name}: installed {report.bundle.describe()} "
            f"until {report.bundle.not_after.isoformat()}"
        )
        for path in report.installed:
            print(f"  {path}")
        for path in report.removed:
            print(f"  removed {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_extra("keylease-agent", "agent", EXTRA_MODULES)
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    setup_logging(verbose=args.verbose, journal=journal_wanted(os.environ))
    # ESYS prints expected TPM errors (e.g. a policy failure) to stderr; ours are clearer.
    os.environ.setdefault("TSS2_LOG", "esys+none")
    try:
        if args.command == "check-config":
            cfg = load_config(args.config)
            print(f"{cfg.path}: ok (node {cfg.node_name}, broker {cfg.kbs}, tcti {cfg.tcti})")
            return 0
        if args.command == "run":
            return _run(args.config)
        if args.command == "status":
            return _status(args.config, args.json)
        return _attest(args.config, args.json)
    except AgentError as exc:
        print(f"keylease-agent: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""keylease-kbs command line: the broker daemon (``serve``) and the operators' tool.

Operator commands run on the local database, or on a remote broker's admin API with
--server HOST:PORT --admin-cert DIR (or --profile NAME from ~/.config/keylease/kbs-client.toml).

Exit codes: 0 ok; 2 usage, configuration or an operator argument that cannot be carried out
(bad selector, unknown node/key/policy, unusable key file), or an installation without the
``broker`` extra; 1 any other broker error (e.g. the database). Errors print one line
"keylease-kbs: <what is wrong and what to do>".

The commands: ``init`` (``kbs.cli.init``), ``check-config`` and ``serve`` (``kbs.cli.broker``),
the operator commands, local or remote (``kbs.cli.operator``), ``admin-cert`` and ``master-key``
on the broker host (``kbs.cli.host``); arguments in ``kbs.cli.parser``, listings in
``kbs.cli.output``. They are imported only after the extras check. This package is the only
place that configures the broker's logging.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from kbs.cli.parser import LOCAL_ONLY, Handler, build_parser
from kbs.errors import ConfigError, KbsError, OperatorError
from keylease.extras import missing_extra

__all__ = ["BROKER_MODULES", "main"]

# What the broker extra installs (pyproject.toml [project.optional-dependencies] broker).
BROKER_MODULES = (
    "sqlalchemy", "alembic", "psycopg", "prometheus_client", "grpc_health", "tpm2_pytss",
)  # fmt: skip


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # Alembic reports every migration check at INFO; only its warnings are worth a line.
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _handlers() -> dict[str, Handler]:
    """Every command's handler. Imported here, after the extras check: they need the broker's
    dependencies."""
    from kbs.cli import broker, host, init, operator, policy

    return {
        **init.COMMANDS, **broker.COMMANDS, **operator.COMMANDS, **policy.COMMANDS,
        **host.COMMANDS,
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_extra("keylease-kbs", "broker", BROKER_MODULES)
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging(args.verbose)
    command: str = args.command
    remote = args.server is not None or args.admin_cert is not None or args.profile is not None
    try:
        if remote and command.split()[0] in LOCAL_ONLY:
            raise OperatorError(
                f"`{command}` runs on the broker host only; drop --server/--admin-cert/--profile"
            )
        return _handlers()[command](args)
    except (ConfigError, OperatorError) as exc:
        print(f"keylease-kbs: {exc.diagnostics()}", file=sys.stderr)
        return 2
    except KbsError as exc:
        print(f"keylease-kbs: {exc.diagnostics()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

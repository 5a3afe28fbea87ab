"""``keylease-kbs check-config`` and ``serve``: the broker on this host.

``check_files`` opens every file the config names with the very loaders ``serve`` uses
(``kbs.tls.load_credentials``, ``kbs.masterkey.master_keyring``,
``kbs.signing.load_signing_keys``,
``kbs.tpm.ekcert.load_ek_roots``),
and ``serve`` runs it before it starts: a file that one accepts, the other accepts, and a file
one refuses, the other refuses with the same message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
from pathlib import Path

from kbs.admin.certs import check_admin_files
from kbs.cli.parser import Handler
from kbs.config import KbsConfig, load_config
from kbs.errors import ConfigError
from kbs.masterkey import MASTER_KEY_BYTES, master_keyring
from kbs.signing import load_signing_keys
from kbs.store.database import redact_url
from kbs.tls import load_credentials
from kbs.tpm.ekcert import EkTrustBundle, load_ek_roots
from keylease.hardening import harden_process

__all__ = ["COMMANDS", "check_files"]

log = logging.getLogger(__name__)


def check_files(cfg: KbsConfig) -> list[str]:
    """Open every file the config names; one summary line per file, or raise ConfigError."""
    creds = load_credentials(cfg.tls_cert, cfg.tls_key)
    master_keyring(cfg)
    signing = load_signing_keys(cfg)
    signer = signing.current
    roots = load_ek_roots(cfg.ek_roots)
    olds = f"; {len(cfg.previous_master_keys)} previous" if cfg.previous_master_keys else ""
    return [
        f"config {cfg.path}: ok (listen {cfg.listen_host}:{cfg.listen_port}, "
        f"enrollment {cfg.enrollment.value})",
        f"tls_cert {cfg.tls_cert}: valid until {creds.not_after:%Y-%m-%d} for "
        f"{', '.join(creds.names) or 'no subject alternative name'}; key matches",
        f"master_key {cfg.master_key}: {MASTER_KEY_BYTES} bytes, private{olds}",
        f"signing_cert {cfg.signing_cert}: release signing, valid until "
        f"{signer.not_after:%Y-%m-%d}, issued by admin_ca {cfg.admin_ca}; key matches"
        + (f"; {len(signing.previous)} previous kept" if signing.previous else ""),
        _ek_roots_line(cfg.ek_roots, roots),
        _check_database(cfg.database),
    ]


def _ek_roots_line(path: Path, bundle: EkTrustBundle) -> str:
    now = dt.datetime.now(dt.UTC)
    expired = sum(1 for c in bundle.certificates if c.not_valid_after_utc < now)
    extra = f" ({expired} expired)" if expired else ""
    return f"ek_roots {path}: {len(bundle.certificates)} CA certificate(s){extra}"


def _check_database(path: Path | str) -> str:
    if isinstance(path, str):
        return f"database {redact_url(path)}: PostgreSQL, connected and migrated at start"
    directory = path.parent
    if not directory.is_dir():
        raise ConfigError(f"database directory {directory} does not exist; create it")
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"database {path} is not a regular file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"database {path} is not readable and writable by this user")
        return f"database {path}: exists"
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            f"database {path} does not exist and its directory is not writable by this user"
        )
    return f"database {path}: will be created at start"


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for line in [*check_files(cfg), *check_admin_files(cfg, dt.datetime.now(dt.UTC))]:
        print(line)
    print("ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for line in check_files(cfg):
        log.debug("%s", line)
    # Imported here: only the server needs the TPM structure and gRPC service modules.
    from kbs.server import serve

    harden_process("keylease-kbs")  # it holds the master key and opened image keys
    serve(cfg, args.ready_file)
    return 0


COMMANDS: dict[str, Handler] = {
    "check-config": cmd_check_config,
    "serve": cmd_serve,
}

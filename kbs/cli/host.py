"""``keylease-kbs admin-cert ...``, ``signing-key create`` and ``master-key ...``: operator commands
that run on the broker host only (they need the CA key or write the master key and ``kbs.toml``),
never over the admin API.

``signing-key create --replace`` keeps the old key (certificate and key in one file,
``tls/signing-previous-<time>.pem``, 0600) in ``previous_signing_keys``: caches released before
are bound to it (PolicyAuthorize), and approvals for them are signed with it while it is kept.

``master-key rotate`` (``--new-key FILE`` or ``--generate``): the new key becomes ``master_key``
in ``kbs.toml`` and the old one moves to ``previous_master_keys`` (the file is rewritten
atomically, comments kept), then every stored key version is re-encrypted under the new key,
each row swapped in its own short transaction. Running brokers keep serving throughout: blobs
carry the id of the key that sealed them, and a broker meeting an id it does not hold re-reads
the keys ``kbs.toml`` names. ``master-key status`` shows how many key versions each master key
still seals; once the old key seals none on every database, drop it from
``previous_master_keys``.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from kbs.admin.actions import Admin
from kbs.admin.certs import (
    AdminCertState,
    issue_admin_cert,
    list_admin_certs,
    load_ca,
    revoke_admin_cert,
)
from kbs.cli.operator import actor, now
from kbs.cli.output import dump_json, render_table
from kbs.cli.parser import Handler
from kbs.config import KbsConfig, load_config
from kbs.errors import ConfigError
from kbs.masterkey import blob_key_id, key_id, master_keyring, new_master_key, read_master_key
from kbs.signing import create_signing_files, load_signer, load_signing_keys
from kbs.store import Store
from kbs.tls import write_new_file

__all__ = ["COMMANDS"]


def _audit(cfg: KbsConfig, event: str, detail: str) -> None:
    with Store.open(cfg.database) as store:
        store.audit(actor=actor(), event=event, node=None, result="ok", detail=detail, now=now())


# --- admin certificates ----------------------------------------------------------------------


def cmd_admin_cert_issue(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    record = issue_admin_cert(cfg, args.name, args.days, args.out, now())
    _audit(cfg, "admin-cert-issue", f"admin certificate {record.name} serial {record.serial} "
           f"valid until {record.not_after.isoformat(timespec='seconds')}")  # fmt: skip
    print(
        f"admin certificate {record.name}: serial {record.serial}, valid until "
        f"{record.not_after:%Y-%m-%d %H:%M} UTC"
    )
    print(f"wrote {args.out}/admin.pem, admin-key.pem (0600), ca.pem; use it with")
    print(f"  keylease-kbs --server HOST:PORT --admin-cert {args.out} node list")
    return 0


def cmd_admin_cert_revoke(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    revoked = revoke_admin_cert(cfg, args.name, now(), actor())
    serials = ", ".join(r.serial for r in revoked)
    print(
        f"admin certificate {args.name}: revoked (serial {serials}) in {cfg.admin_certs} and in "
        "the database; every broker sharing the database refuses it from now on"
    )
    return 0


def cmd_admin_cert_list(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    with Store.open(cfg.database) as store:
        listed = list_admin_certs(cfg, store, now())
    rows = [[r.name, r.serial, r.not_after.isoformat(timespec="seconds"), state.value]
            for r, state in listed]  # fmt: skip
    if args.json:
        print(dump_json([dict(zip(["name", "serial", "not_after", "state"], row, strict=True))
                         for row in rows]))  # fmt: skip
        return 0
    print(render_table(["NAME", "SERIAL", "NOT_AFTER", "STATE"], rows))
    if any(state is AdminCertState.REVOKED_LOCALLY for _, state in listed):
        print(
            "revoked-locally: revoked in this host's admin_certs but not in the database, so "
            "replicas on other hosts may still accept it; run `keylease-kbs admin-cert revoke "
            "NAME` again"
        )
    return 0


# --- kbs.toml rewrites -------------------------------------------------------------------------


def _quote(path: Path, base: Path) -> str:
    text = str(path.relative_to(base)) if path.is_relative_to(base) else str(path)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _paths(paths: list[Path], base: Path) -> str:
    return f"[{', '.join(_quote(p, base) for p in paths)}]"


def _set_config_keys(cfg: KbsConfig, values: dict[str, str]) -> KbsConfig:
    """Rewrite ``kbs.toml`` with each top-level ``key = value`` of ``values`` (replaced where it
    is, appended otherwise), atomically, comments kept; the result is loaded to check it."""
    patterns = {key: re.compile(rf"\s*{key}\s*=") for key in values}
    out, seen = [], set()
    for line in cfg.path.read_text().splitlines():
        key = next((k for k, pattern in patterns.items() if pattern.match(line)), None)
        if key is None:
            out.append(line)
            continue
        if values[key].startswith("[") and "]" not in line:
            raise ConfigError(
                f"{cfg.path}: write {key} on one line so that this command can update it"
            )
        out.append(f"{key} = {values[key]}")
        seen.add(key)
    out += [f"{key} = {value}" for key, value in values.items() if key not in seen]
    tmp = cfg.path.with_name(cfg.path.name + ".tmp")
    try:
        tmp.write_text("\n".join([*out, ""]))
        os.chmod(tmp, cfg.path.stat().st_mode & 0o777)
        load_config(tmp)
        tmp.replace(cfg.path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot rewrite {cfg.path}: {exc.strerror}") from None
    except ConfigError:
        tmp.unlink(missing_ok=True)
        raise
    return load_config(cfg.path)


# --- release-signing key ---------------------------------------------------------------------


def _keep_previous(cfg: KbsConfig) -> KbsConfig:
    """Before ``--replace``: the current key and certificate into one PEM file (0600) next to
    them, named in ``previous_signing_keys`` (caches bound to it keep receiving approvals)."""
    old = load_signer(cfg)
    kept = cfg.signing_key.with_name(f"signing-previous-{now():%Y%m%dT%H%M%S}.pem")
    pem = cfg.signing_cert.read_bytes() + cfg.signing_key.read_bytes()
    owner = cfg.signing_key.stat()
    try:
        write_new_file(kept, pem, 0o600)
        os.chown(kept, owner.st_uid, owner.st_gid)
    except OSError as exc:
        kept.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {kept}: {exc.strerror}") from None
    base = cfg.path.parent
    paths = list(dict.fromkeys([kept, *cfg.previous_signing_keys]))
    updated = _set_config_keys(cfg, {"previous_signing_keys": _paths(paths, base)})
    print(f"kept the old key (certificate valid until {old.not_after:%Y-%m-%d}) as {kept}")
    return updated


def cmd_signing_key_create(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    ca, ca_key = load_ca(cfg)
    if args.replace and cfg.signing_key.exists():
        cfg = _keep_previous(cfg)
    create_signing_files(ca, ca_key, cfg.signing_key, cfg.signing_cert, now(), replace=args.replace)
    signer = load_signing_keys(cfg).current  # exactly the check `serve` and the agents make
    _audit(cfg, "signing-key-create", f"release-signing certificate valid until "
           f"{signer.not_after.isoformat(timespec='seconds')}")  # fmt: skip
    print(f"wrote {cfg.signing_key} (0600) and {cfg.signing_cert}, issued by {cfg.admin_ca}")
    print("the broker signs releases with it, and binds new releases to it, from its next start")
    if args.replace:
        print(
            "caches bound to the old key keep receiving approvals signed with it while it is in "
            "previous_signing_keys; remove it from there once every node has renewed (one lease)"
        )
    return 0


# --- master key ------------------------------------------------------------------------------


def _rewrite_config(cfg: KbsConfig, new: Path) -> KbsConfig:
    """Point ``master_key`` at ``new`` and prepend the old key to ``previous_master_keys``."""
    base = cfg.path.parent
    olds = list(dict.fromkeys([cfg.master_key, *cfg.previous_master_keys]))
    return _set_config_keys(
        cfg, {"master_key": _quote(new, base), "previous_master_keys": _paths(olds, base)}
    )


def cmd_master_key_rotate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    old = master_keyring(cfg)  # every configured key must be readable before anything changes
    owner = cfg.master_key.stat()  # the broker's user must be able to read the new key too
    if args.generate:
        new = cfg.path.parent / f"master-{now():%Y%m%dT%H%M%S}.key"
        try:
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot write {new}: {exc.strerror}") from None
        try:
            os.fchown(fd, owner.st_uid, owner.st_gid)
            os.write(fd, new_master_key().reveal())
        except OSError as exc:
            new.unlink(missing_ok=True)
            raise ConfigError(f"cannot write {new}: {exc.strerror}") from None
        finally:
            os.close(fd)
    else:
        new = args.new_key.absolute()
        if new.exists() and new.stat().st_uid != owner.st_uid:
            raise ConfigError(
                f"{new} is owned by uid {new.stat().st_uid} but master_key {cfg.master_key} by "
                f"uid {owner.st_uid}: the broker could not read it; run `chown "
                f"--reference={cfg.master_key} {new}` first"
            )
    if key_id(read_master_key(cfg, new).reveal()) == old.current_id:
        # an interrupted rotation: the config is already updated, finish the re-encryption
        updated = cfg
        print(f"{new} is already master_key in {cfg.path}; re-encrypting what is left")
    else:
        updated = _rewrite_config(cfg, new)
        print(f"{cfg.path}: master_key = {new}; the old key moved to previous_master_keys")
    ring = master_keyring(updated)
    with Store.open(updated.database) as store:
        count = Admin(store=store, actor=actor(), clock=now).reseal_keys(ring)
    print(f"re-encrypted {count} key version(s) under master key {ring.current_id}")
    print(
        "once every broker sharing this database has the new kbs.toml and master key file, "
        "remove the old key from previous_master_keys and destroy it (see `master-key status`)"
    )
    return 0


def cmd_master_key_status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    ring = master_keyring(cfg)
    with Store.open(cfg.database) as store:
        rows = store.sealed_key_rows()
    counts: dict[str, int] = {}
    for row in rows:
        kid = blob_key_id(row.encrypted_private) or "(version 1, no key id)"
        counts[kid] = counts.get(kid, 0) + 1
    paths = [cfg.master_key, *cfg.previous_master_keys]
    table = [[kid, str(p), "current" if i == 0 else "previous", str(counts.pop(kid, 0))]
             for i, (kid, p) in enumerate(zip(ring.key_ids, paths, strict=False))]  # fmt: skip
    table += [[kid, "-", "NOT CONFIGURED", str(n)] for kid, n in counts.items()]
    print(render_table(["KEY_ID", "FILE", "ROLE", "KEY_VERSIONS_SEALED"], table))
    return 0


COMMANDS: dict[str, Handler] = {
    "admin-cert issue": cmd_admin_cert_issue,
    "admin-cert revoke": cmd_admin_cert_revoke,
    "admin-cert list": cmd_admin_cert_list,
    "signing-key create": cmd_signing_key_create,
    "master-key rotate": cmd_master_key_rotate,
    "master-key status": cmd_master_key_status,
}

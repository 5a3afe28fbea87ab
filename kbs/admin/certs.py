"""Operator client certificates for the admin API: issue, list, revoke, and the check every admin
RPC makes.

An admin certificate is issued by the broker's CA (``admin_ca`` / ``admin_ca_key``, the ``tls/``
CA from ``init``) with subject ``CN=<name>, OU=keylease-admin``, extended key usage clientAuth
only and a validity of ``--days``. ``admin-cert issue NAME --out DIR`` writes ``DIR/admin.pem``,
``DIR/admin-key.pem`` (0600) and ``DIR/ca.pem`` (to verify the broker).

Issued certificates are listed in ``admin_certs`` (``admin-certs.json`` next to the config, not
secret): the file lives beside the CA key that issues them, so issuing is possible only on a host
holding that key, and replicas receive it the way they receive ``tls/`` and the master key. A
certificate that is not listed there (e.g. the broker's own server certificate, signed by the
same CA) is refused.

Revocations are recorded twice: in ``admin_certs`` and in the database (``admin_revocations``,
``kbs.store.revocations``). Every admin RPC re-reads the file and asks the database, and refuses a
certificate revoked in either, so ``admin-cert revoke`` on one host takes effect at once on every
replica sharing the database, whether or not its copy of the file has been updated. The check
fails closed: while the database cannot be read, every admin RPC is refused (UNAVAILABLE, naming
the database), never allowed on the file alone.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kbs.config import KbsConfig
from kbs.errors import (
    AdminAccessDenied,
    ConfigError,
    NotFound,
    OperatorError,
    RevocationNotShared,
    RevocationsUnreadable,
    StoreError,
)
from kbs.model import check_name
from kbs.store import AdminRevocation, AuditEvent, Store
from kbs.tls import issue_leaf, key_pem, write_new_file
from keylease.certificates import MALFORMED

__all__ = [
    "ADMIN_OU",
    "AdminCertRecord",
    "AdminCertState",
    "check_admin_files",
    "issue_admin_cert",
    "list_admin_certs",
    "load_admin_ca",
    "load_ca",
    "revoke_admin_cert",
    "verify_admin_cert",
]

ADMIN_OU = "keylease-admin"
MAX_DAYS = 825
CERT_FILE, KEY_FILE, CA_FILE = "admin.pem", "admin-key.pem", "ca.pem"


class AdminCertState(StrEnum):
    VALID = "valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    REVOKED_LOCALLY = "revoked-locally"  # in admin_certs only: other replicas may accept it


@dataclass(frozen=True)
class AdminCertRecord:
    name: str
    serial: str  # hex
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None


def _record_json(r: AdminCertRecord) -> dict[str, str | None]:
    return {
        "name": r.name,
        "serial": r.serial,
        "not_before": r.not_before.isoformat(),
        "not_after": r.not_after.isoformat(),
        "revoked_at": None if r.revoked_at is None else r.revoked_at.isoformat(),
    }


def _read_registry(path: Path) -> list[AdminCertRecord]:
    try:
        raw = json.loads(path.read_text())
        return [
            AdminCertRecord(
                name=str(e["name"]),
                serial=str(e["serial"]),
                not_before=dt.datetime.fromisoformat(e["not_before"]),
                not_after=dt.datetime.fromisoformat(e["not_after"]),
                revoked_at=None
                if e["revoked_at"] is None
                else dt.datetime.fromisoformat(e["revoked_at"]),
            )
            for e in raw["certs"]
        ]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read admin_certs {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"admin_certs {path} is damaged (not the JSON `admin-cert` writes); restore it from "
            "a backup: until then no admin certificate is accepted"
        ) from None


@contextmanager
def _locked_registry(path: Path) -> Iterator[list[AdminCertRecord]]:
    """Read, let the caller change, then atomically rewrite the registry (one writer at once)."""
    try:
        lock = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot lock admin_certs {path}: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = _read_registry(path)
        yield records
        tmp = path.with_name(path.name + ".tmp")
        text = json.dumps({"version": 1, "certs": [_record_json(r) for r in records]}, indent=2)
        try:
            tmp.write_text(text + "\n")
            os.chmod(tmp, 0o644)
            tmp.replace(path)
        except OSError as exc:
            raise ConfigError(f"cannot write admin_certs {path}: {exc.strerror}") from None
    finally:
        os.close(lock)


def load_admin_ca(cfg: KbsConfig) -> bytes:
    """The PEM of ``admin_ca`` (the trust anchor for admin client certificates)."""
    try:
        data = cfg.admin_ca.read_bytes()
        x509.load_pem_x509_certificate(data)
    except OSError as exc:
        raise ConfigError(f"cannot read admin_ca {cfg.admin_ca}: {exc.strerror}") from None
    except MALFORMED:
        raise ConfigError(f"admin_ca {cfg.admin_ca} is not a PEM certificate") from None
    return data


def check_admin_files(cfg: KbsConfig, now: dt.datetime) -> list[str]:
    """For check-config: the admin API's trust anchor and registry open; raises ConfigError."""
    if cfg.admin_listen is None:
        return ["admin API: off (admin_listen is empty)"]
    ca = x509.load_pem_x509_certificate(load_admin_ca(cfg))
    records = _read_registry(cfg.admin_certs)
    usable = [r for r in records if r.revoked_at is None and r.not_after > now]
    host, port = cfg.admin_listen
    return [
        f"admin_ca {cfg.admin_ca}: valid until {ca.not_valid_after_utc:%Y-%m-%d}",
        f"admin_certs {cfg.admin_certs}: {len(usable)} usable, "
        f"{len(records) - len(usable)} revoked or expired (admin API on {host}:{port})",
    ]


def load_ca(cfg: KbsConfig) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The broker's CA (``admin_ca``) and its key (``admin_ca_key``), to issue certificates."""
    ca = x509.load_pem_x509_certificate(load_admin_ca(cfg))
    try:
        key = serialization.load_pem_private_key(cfg.admin_ca_key.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(
            f"cannot read admin_ca_key {cfg.admin_ca_key}: {exc.strerror}; certificates "
            "are issued on the host that holds the broker's CA key"
        ) from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"admin_ca_key {cfg.admin_ca_key} is not an unencrypted PEM key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != ca.public_key():
        raise ConfigError(
            f"admin_ca_key {cfg.admin_ca_key} is not the key of admin_ca {cfg.admin_ca}"
        )
    return ca, key


def issue_admin_cert(
    cfg: KbsConfig, name: str, days: int, out: Path, now: dt.datetime
) -> AdminCertRecord:
    """Issue a certificate for operator ``name`` valid ``days`` days into directory ``out``."""
    check_name(name, "admin certificate")
    if not 1 <= days <= MAX_DAYS:
        raise OperatorError(f"--days must be from 1 to {MAX_DAYS}, got {days}")
    files = [out / CERT_FILE, out / KEY_FILE, out / CA_FILE]
    existing = [str(f) for f in files if f.exists()]
    if existing:
        raise OperatorError(f"{', '.join(existing)} already exist; choose an empty --out directory")
    ca, ca_key = load_ca(cfg)
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ADMIN_OU),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    client_auth = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    cert = issue_leaf(
        ca.subject, ca_key, subject, key.public_key(), start, end, (client_auth, False)
    )
    record = AdminCertRecord(name, format(cert.serial_number, "x"), start, end, None)
    with _locked_registry(cfg.admin_certs) as records:
        try:
            out.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_new_file(files[1], key_pem(key), 0o600)
            write_new_file(files[0], cert.public_bytes(serialization.Encoding.PEM), 0o644)
            write_new_file(files[2], ca.public_bytes(serialization.Encoding.PEM), 0o644)
        except OSError as exc:
            raise OperatorError(f"cannot write {exc.filename or out}: {exc.strerror}") from None
        records.append(record)
    return record


def revoke_admin_cert(
    cfg: KbsConfig, name: str, now: dt.datetime, actor: str
) -> list[AdminCertRecord]:
    """Revoke every certificate issued to ``name`` (NotFound if ``admin_certs`` lists none), in
    ``admin_certs`` and in the database, with an audit row; returns them, all revoked.

    One operator action in two places, done file first: the revocation is marked in
    ``admin_certs`` (certificates already revoked there keep their time), then every serial of
    ``name`` is written to the database (idempotent) with the audit row, in one transaction. If
    the database cannot be written this raises ``RevocationNotShared``, so the command fails and
    says that only this host refuses the certificate. The file is not rolled back: a revocation
    that this host enforces is strictly safer than none, and the failure is not hidden, because
    the command exits non-zero, ``admin-cert list`` shows the certificate as ``revoked-locally``
    (in the file, not in the database) until it is, and running the same command again (no
    longer refused as "already revoked") completes it. Writing the database first instead would
    leave nothing revoked anywhere after a failure. Certificates revoked in the file before the
    database recorded revocations are pushed to it the same way.
    """
    with _locked_registry(cfg.admin_certs) as records:
        hits = [i for i, r in enumerate(records) if r.name == name]
        if not hits:
            raise NotFound(
                f"no admin certificate named {name!r}; `keylease-kbs admin-cert list` shows them"
            )
        for i in hits:
            if records[i].revoked_at is None:
                records[i] = replace(records[i], revoked_at=now)
        revoked = [records[i] for i in hits]
    serials = ", ".join(r.serial for r in revoked)
    rows = [AdminRevocation(r.serial, r.name, r.revoked_at or now) for r in revoked]
    audit = AuditEvent(actor, "admin-cert-revoke", None, "ok",
                       f"admin certificate {name} serial(s) {serials}")  # fmt: skip
    try:
        with Store.open(cfg.database) as store:
            store.add_admin_revocations(rows, audit, now)
    except StoreError as exc:
        raise RevocationNotShared(
            f"admin certificate {name} (serial {serials}) is revoked in admin_certs "
            f"{cfg.admin_certs} only: the database could not be written ({exc.diagnostics()}). "
            "Brokers on this host refuse it, but replicas on other hosts still accept it: run "
            f"`keylease-kbs admin-cert revoke {name}` again once the database answers"
        ) from None
    return revoked


def list_admin_certs(
    cfg: KbsConfig, store: Store, now: dt.datetime
) -> list[tuple[AdminCertRecord, AdminCertState]]:
    """The certificates ``admin_certs`` lists, each with its state; ``revoked_at`` is the file's
    time, else the database's. StoreError if the database cannot be read."""
    in_db = {r.serial: r for r in store.list_admin_revocations()}
    out = []
    for r in _read_registry(cfg.admin_certs):
        db = in_db.get(r.serial)
        if db is not None:
            state = AdminCertState.REVOKED
        elif r.revoked_at is not None:
            state = AdminCertState.REVOKED_LOCALLY
        else:
            state = AdminCertState.EXPIRED if r.not_after < now else AdminCertState.VALID
        if r.revoked_at is None and db is not None:
            r = replace(r, revoked_at=db.revoked_at)
        out.append((r, state))
    return out


def verify_admin_cert(
    chain_pem: Sequence[bytes], ca_pem: bytes, registry: Path, store: Store, now: dt.datetime
) -> str:
    """The operator name (CN) of a client certificate allowed on the admin API, or
    AdminAccessDenied saying why not: signed by the CA, in its validity period, EKU clientAuth,
    OU=keylease-admin, listed in ``registry`` and revoked neither there nor in ``store`` (the
    database every replica shares). RevocationsUnreadable (a refusal too) if the database cannot
    be read: never allowed on the file alone."""
    if not chain_pem:
        raise AdminAccessDenied("no client certificate: the admin API needs an admin certificate")
    try:
        cert = x509.load_pem_x509_certificate(chain_pem[0])
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, *MALFORMED):
        raise AdminAccessDenied("the client certificate is not issued by the broker's CA") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        eku = x509.ExtendedKeyUsage([])
    if [u.value for u in units] != [ADMIN_OU] or list(eku) != [ExtendedKeyUsageOID.CLIENT_AUTH]:
        raise AdminAccessDenied(
            "the client certificate is not an admin certificate (OU=keylease-admin, EKU "
            "clientAuth); issue one with `keylease-kbs admin-cert issue NAME`"
        )
    name = str(names[0].value) if len(names) == 1 else ""
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AdminAccessDenied(f"admin certificate {name!r} is expired or not yet valid")
    serial = format(cert.serial_number, "x")
    record = next((r for r in _read_registry(registry) if r.serial == serial), None)
    if record is None or record.name != name:
        raise AdminAccessDenied(f"admin certificate {name!r} (serial {serial}) was not issued here")
    revoked_at = record.revoked_at
    if revoked_at is None:
        try:
            revocation = store.admin_revocation(serial)
        except StoreError as exc:
            raise RevocationsUnreadable(
                f"admin certificate {name!r} (serial {serial}) refused: cannot check the "
                f"revocations in the database: {exc.diagnostics()}"
            ) from None
        revoked_at = None if revocation is None else revocation.revoked_at
    if revoked_at is not None:
        raise AdminAccessDenied(
            f"admin certificate {name!r} (serial {serial}) was revoked at "
            f"{revoked_at.isoformat(timespec='seconds')}"
        )
    return name

"""Boot event logs for tests, benchmarks and the demo, and TPMs that agree with them.

- ``build_log``: a TCG PC Client crypto-agile log (any of sha1/sha256/sha384) of ``LogEvent``s;
  ``build_legacy_log`` the TCG 1.2 SHA-1 form; ``build_event_log`` the old shorthand (EV_IPL events
  of ``(pcr, data)``).
- Encoders for the event data the broker decodes (UEFI_VARIABLE_DATA, EFI_SIGNATURE_LISTs,
  UEFI_IMAGE_LOAD_EVENT with a file-path device path, tagged events) and ``boot_events``: a
  Secure Boot machine booting shim, GRUB and a kernel (the shape of a Debian UEFI boot).
- ``extend_tpm``: extend an swtpm's PCRs with the events' digests, so that a quote and the log
  agree; ``oracle_events`` reads a log's events with ``tpm2_eventlog`` (tpm2-tools), independent of
  the broker's parser, e.g. to put a committed OVMF log into an swtpm.

Written independently of ``kbs.eventlog``: these are the inputs its tests check it against.
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = [
    "EFI_GLOBAL",
    "EV_EFI_ACTION",
    "EV_NO_ACTION",
    "EV_SEPARATOR",
    "IMAGE_DB",
    "BootSpec",
    "LogEvent",
    "boot_events",
    "build_event_log",
    "build_legacy_log",
    "build_log",
    "extend_tpm",
    "image_load",
    "measured",
    "oracle_events",
    "oracle_pcrs",
    "replace_digest",
    "signature_list",
    "signing_certificate",
    "tagged",
    "uefi_variable",
]

EV_POST_CODE, EV_NO_ACTION, EV_SEPARATOR, EV_EVENT_TAG = 0x1, 0x3, 0x4, 0x6
EV_S_CRTM_VERSION, EV_IPL = 0x8, 0xD
EV_EFI_VARIABLE_DRIVER_CONFIG, EV_EFI_VARIABLE_BOOT = 0x80000001, 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION, EV_EFI_ACTION = 0x80000003, 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB, EV_EFI_VARIABLE_AUTHORITY = 0x80000008, 0x800000E0
ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C}
DEFAULT_BANKS = ("sha1", "sha256")
EFI_GLOBAL = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
IMAGE_DB = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
OWNER = uuid.UUID("77fa9abd-0359-4d32-bd60-28f4e78f784b")
SEPARATOR = b"\x00\x00\x00\x00"


@dataclass(frozen=True)
class LogEvent:
    pcr: int
    type: int
    data: bytes
    digests: dict[str, bytes] = field(default_factory=dict)  # bank -> digest


def measured(
    pcr: int, event_type: int, data: bytes, *, measure: bytes | None = None,
    banks: Sequence[str] = ("sha1", "sha256", "sha384"),
) -> LogEvent:  # fmt: skip
    """An event whose digests are the hashes of ``measure`` (default: of its data)."""
    content = data if measure is None else measure
    return LogEvent(pcr, event_type, data, {b: hashlib.new(b, content).digest() for b in banks})


def _spec_id_event(banks: Sequence[str]) -> bytes:
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(banks))
    for bank in banks:
        body += struct.pack("<HH", ALG_IDS[bank], hashlib.new(bank).digest_size)
    body += b"\x00"  # no vendor info
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def _event2(event: LogEvent, banks: Sequence[str]) -> bytes:
    out = struct.pack("<III", event.pcr, event.type, len(banks))
    for bank in banks:
        digest = event.digests.get(bank)
        if digest is None:  # EV_NO_ACTION events carry zero digests
            digest = bytes(hashlib.new(bank).digest_size)
        out += struct.pack("<H", ALG_IDS[bank]) + digest
    return out + struct.pack("<I", len(event.data)) + event.data


def build_log(events: Iterable[LogEvent], banks: Sequence[str] = DEFAULT_BANKS) -> bytes:
    return _spec_id_event(banks) + b"".join(_event2(e, banks) for e in events)


def build_legacy_log(events: Iterable[LogEvent]) -> bytes:
    """A TCG 1.2 log: TCG_PCR_EVENT records with SHA-1 digests only."""
    out = b""
    for e in events:
        digest = e.digests.get("sha1", bytes(20))
        out += struct.pack("<II", e.pcr, e.type) + digest + struct.pack("<I", len(e.data)) + e.data
    return out


def build_event_log(events: Sequence[tuple[int, bytes]], *, event_type: int = EV_IPL) -> bytes:
    """A sha1+sha256 log of ``(pcr, data)`` events of one type (EV_IPL by default); each event's
    digests hash its data, so ``Tpm.extend_pcr(index, data)`` makes the TPM agree."""
    if event_type == EV_NO_ACTION:
        return build_log(LogEvent(p, event_type, d) for p, d in events)
    return build_log(measured(p, event_type, d, banks=DEFAULT_BANKS) for p, d in events)


# --- event data -----------------------------------------------------------------------------


def uefi_variable(guid: uuid.UUID, name: str, data: bytes) -> bytes:
    """UEFI_VARIABLE_DATA."""
    encoded = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(data)) + encoded + data


def signature_list(kind: uuid.UUID, entries: Sequence[bytes]) -> bytes:
    """One EFI_SIGNATURE_LIST of same-size entries (each with the test owner GUID)."""
    if not entries:
        return b""
    size = 16 + len(entries[0])
    body = b"".join(OWNER.bytes_le + e for e in entries)
    return kind.bytes_le + struct.pack("<III", 28 + len(body), 0, size) + body


def image_load(path: str, length: int = 1 << 20) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT with a device path of one file-path node."""
    name = (path + "\x00").encode("utf-16-le")
    device_path = struct.pack("<BBH", 4, 4, 4 + len(name)) + name + b"\x7f\xff\x04\x00"
    return struct.pack("<QQQQ", 0x7E000000, length, 0, len(device_path)) + device_path


def tagged(tag: int, text: bytes) -> bytes:
    """TCG_PCClientTaggedEvent."""
    return struct.pack("<II", tag, len(text)) + text


def signing_certificate(common_name: str) -> bytes:
    """A self-signed X.509 certificate (DER), standing in for a Secure Boot signing certificate."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class BootSpec:
    """What a test machine boots. Images are stood in for by their names (the digest of an
    application is the hash of ``image``: what the firmware's Authenticode hash would be)."""

    db_certs: tuple[bytes, ...]
    kek_certs: tuple[bytes, ...]
    pk_cert: bytes
    dbx_hashes: tuple[bytes, ...] = ()
    secure_boot: bool = True
    firmware: bytes = b"OVMF firmware volume 2024.02"
    apps: tuple[tuple[str, bytes], ...] = (
        ("\\EFI\\debian\\shimx64.efi", b"shim 15.8"),
        ("\\EFI\\debian\\grubx64.efi", b"grub 2.06-13"),
        ("\\EFI\\debian\\vmlinuz-6.1.0-27-amd64", b"linux 6.1.0-27"),
    )
    cmdline: str = "root=/dev/vda1 ro quiet"
    initrd: bytes = b"initrd.img-6.1.0-27-amd64 contents"
    extra: tuple[LogEvent, ...] = ()  # appended as they are (e.g. unknown event types)
    grub_measures: bool = True  # GRUB measures into PCR 8/9; else the kernel's EFI stub does

    def with_app(self, n: int, path: str, image: bytes) -> BootSpec:
        apps = list(self.apps)
        apps[n - 1] = (path, image)
        return replace(self, apps=tuple(apps))


def _variable(pcr: int, event_type: int, guid: uuid.UUID, name: str, data: bytes) -> LogEvent:
    return measured(pcr, event_type, uefi_variable(guid, name, data))


def boot_events(spec: BootSpec) -> list[LogEvent]:
    """The events a UEFI Secure Boot machine logs booting shim -> GRUB -> Linux."""
    sep = [measured(pcr, EV_SEPARATOR, SEPARATOR) for pcr in range(8)]
    db = signature_list(CERT_X509, [spec.db_certs[0]]) + b"".join(
        signature_list(CERT_X509, [c]) for c in spec.db_certs[1:]
    )
    events = [
        measured(0, EV_S_CRTM_VERSION, "1.0\x00".encode("utf-16-le")),
        measured(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, struct.pack("<QQ", 0x820000, 0xE0000),
                 measure=spec.firmware),
        _variable(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_GLOBAL, "SecureBoot",
                  b"\x01" if spec.secure_boot else b"\x00"),
        _variable(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_GLOBAL, "PK",
                  signature_list(CERT_X509, [spec.pk_cert])),
        _variable(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_GLOBAL, "KEK",
                  signature_list(CERT_X509, list(spec.kek_certs))),
        _variable(7, EV_EFI_VARIABLE_DRIVER_CONFIG, IMAGE_DB, "db", db),
        _variable(7, EV_EFI_VARIABLE_DRIVER_CONFIG, IMAGE_DB, "dbx",
                  signature_list(CERT_SHA256, list(spec.dbx_hashes))),
        sep[7],
        _variable(1, EV_EFI_VARIABLE_BOOT, EFI_GLOBAL, "BootOrder", b"\x01\x00"),
        measured(1, EV_EFI_VARIABLE_BOOT,
                 uefi_variable(EFI_GLOBAL, "Boot0001", b"\x01\x00\x00\x00\x00\x00"
                               + "debian\x00".encode("utf-16-le")),
                 measure=b"\x01\x00\x00\x00\x00\x00" + "debian\x00".encode("utf-16-le")),
        measured(4, EV_EFI_ACTION, b"Calling EFI Application from Boot Option"),
        *sep[:4], *sep[5:7], sep[4],
    ]  # fmt: skip
    for n, (path, image) in enumerate(spec.apps):
        events.append(
            measured(4, EV_EFI_BOOT_SERVICES_APPLICATION, image_load(path), measure=image)
        )
        if n == 0 and spec.secure_boot:  # db verified shim
            events.append(
                _variable(7, EV_EFI_VARIABLE_AUTHORITY, IMAGE_DB, "db",
                          OWNER.bytes_le + spec.db_certs[0])
            )  # fmt: skip
    kernel = spec.apps[-1][0].replace("\\", "/").rsplit("/", 1)[-1]
    if not spec.grub_measures:  # the EFI stub: load options and initrd, tagged, in PCR 9
        options = (spec.cmdline + "\0").encode("utf-16-le")
        return [
            *events,
            measured(9, EV_EVENT_TAG, tagged(0x8F3B22ED, b"LOADED_IMAGE::LoadOptions\0"),
                     measure=options),
            measured(9, EV_EVENT_TAG, tagged(0x8F3B22EC, b"Linux initrd\0"), measure=spec.initrd),
            measured(5, EV_EFI_ACTION, b"Exit Boot Services Invocation"),
            *spec.extra,
        ]  # fmt: skip
    events += [
        measured(8, EV_IPL, f"grub_cmd: linux /boot/{kernel} {spec.cmdline}".encode() + b"\0",
                 measure=f"linux /boot/{kernel} {spec.cmdline}".encode()),
        measured(8, EV_IPL, f"kernel_cmdline: /boot/{kernel} {spec.cmdline}".encode() + b"\0",
                 measure=f"/boot/{kernel} {spec.cmdline}".encode()),
        measured(9, EV_IPL, f"/boot/{kernel}".encode() + b"\0", measure=spec.apps[-1][1]),
        measured(9, EV_IPL, b"/boot/initrd.img\0", measure=spec.initrd),
        measured(5, EV_EFI_ACTION, b"Exit Boot Services Invocation"),
        *spec.extra,
    ]  # fmt: skip
    return events


# --- TPMs that agree with a log, and the tpm2_eventlog oracle --------------------------------


def extend_tpm(tcti: str, events: Iterable[LogEvent]) -> None:
    """Extend the TPM's PCRs with every event's digests (banks the TPM does not have active are
    ignored by TPM2_PCR_Extend); EV_NO_ACTION events are not extended."""
    from tpm2_pytss import (
        ESAPI,
        ESYS_TR,
        TPM2_ALG,
        TPML_DIGEST_VALUES,
        TPMT_HA,
        TPMU_HA,
        TCTILdr,
    )

    algs = {"sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}
    if not tcti.startswith("swtpm:path="):
        raise ValueError("extend_tpm takes an explicit swtpm:path=... TCTI")
    with TCTILdr.parse(tcti) as loader, ESAPI(loader) as esys:
        for e in events:
            if e.type == EV_NO_ACTION or not e.digests:
                continue
            values = TPML_DIGEST_VALUES(
                [TPMT_HA(hashAlg=algs[b], digest=TPMU_HA(**{b: d}))
                 for b, d in e.digests.items() if b in algs]
            )  # fmt: skip
            esys.pcr_extend(ESYS_TR(ESYS_TR.PCR0 + e.pcr), values, session1=ESYS_TR.PASSWORD)


def _eventlog_yaml(path: Path) -> str:
    return subprocess.run(
        ["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True, timeout=60
    ).stdout


_EVENT = re.compile(r"^- EventNum: (\d+)$", re.M)


def oracle_events(path: Path) -> list[LogEvent]:
    """The log's events as ``tpm2_eventlog`` reads them: PCR, type, digests (data omitted)."""
    out = _eventlog_yaml(path).split("\npcrs:")[0]
    events = []
    for chunk in _EVENT.split(out)[2::2]:
        pcr = int(re.search(r"PCRIndex: (\d+)", chunk).group(1))  # type: ignore[union-attr]
        etype = re.search(r"EventType: (\S+)", chunk).group(1)  # type: ignore[union-attr]
        digests = dict(re.findall(r'AlgorithmId: (\w+)\n\s+Digest: "([0-9a-f]+)"', chunk))
        events.append(
            LogEvent(pcr, EV_NO_ACTION if etype == "EV_NO_ACTION" else 0, b"",
                     {b: bytes.fromhex(d) for b, d in digests.items()})
        )  # fmt: skip
    return events


def oracle_pcrs(path: Path) -> dict[str, dict[int, bytes]]:
    """The PCR values ``tpm2_eventlog`` replays the log to, per bank."""
    tail = _eventlog_yaml(path).split("\npcrs:", 1)[1]
    banks: dict[str, dict[int, bytes]] = {}
    for bank, body in re.findall(r"^  (\w+):\n((?:    .*\n?)+)", tail, re.M):
        banks[bank] = {
            int(i): bytes.fromhex(v) for i, v in re.findall(r"(\d+)\s*:\s*0x([0-9a-fA-F]+)", body)
        }
    return banks


def replace_digest(log: bytes, old: bytes, new: bytes) -> bytes:
    """``log`` with one event's digest swapped (e.g. another kernel image loaded)."""
    if len(old) != len(new) or log.count(old) != 1:
        raise ValueError("the digest to replace must occur exactly once, replaced by one as long")
    return log.replace(old, new)

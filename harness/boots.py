"""Test machines booting: a Secure Boot machine's boot (``SPEC``) and its kernel updates, put into
a node's swtpm (its PCRs extended with the events) and its event log file, as firmware would.
No pytest imports (benchmarks and the demo use it too)."""

from __future__ import annotations

from collections.abc import Sequence

from harness.eventlog import (
    BootSpec,
    LogEvent,
    boot_events,
    build_log,
    extend_tpm,
    signing_certificate,
)
from harness.nodes import Node

__all__ = ["KERNEL_28", "KERNEL_29", "SPEC", "boot", "boot_events_into", "kernel"]

SPEC = BootSpec(
    db_certs=(signing_certificate("Debian Secure Boot CA"),),
    kek_certs=(signing_certificate("Debian KEK"),),
    pk_cert=signing_certificate("Platform Key"),
    dbx_hashes=(b"\x11" * 32,),
    grub_measures=False,  # the kernel's EFI stub measures its command line and initrd
)


def kernel(version: str) -> BootSpec:
    """``SPEC`` booting kernel 6.1.0-``version`` (boot application 3)."""
    return SPEC.with_app(3, f"\\EFI\\debian\\vmlinuz-6.1.0-{version}-amd64",
                         f"linux 6.1.0-{version}".encode())  # fmt: skip


KERNEL_28 = kernel("28")
KERNEL_29 = kernel("29")


def boot_events_into(node: Node, events: Sequence[LogEvent], log: bytes) -> None:
    """The node's TPM measures ``events`` and its event log file holds ``log`` (the TPM must be
    freshly started: PCRs at reset)."""
    extend_tpm(node.tpm.tcti, events)
    node.event_log = node.root / "binary_bios_measurements"
    node.event_log.write_bytes(log)


def boot(node: Node, spec: BootSpec, *, reboot: bool = False) -> None:
    """The node boots ``spec`` (``reboot``: its TPM restarts first, as at a reboot)."""
    if reboot:
        node.tpm.restart()
    events = boot_events(spec)
    boot_events_into(node, events, build_log(events, ("sha1", "sha256")))

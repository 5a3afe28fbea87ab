"""Parse + evaluate time of a boot event log of N events (default 1,000), in-process.

The log is a Secure Boot machine's boot (``harness.eventlog.boot_events``: firmware, Secure Boot
variables and authorities, shim, GRUB, kernel, command line, initrd) padded with the events a busy
machine adds: option-ROM drivers (PCR 2), boot variables (PCR 1), GRUB commands and files read
(PCR 8/9), unknown event types. A policy is learned from it (every component), then each run
reads it through a new, empty log cache (``kbs.eventlog.EventLogCache``) and times what an
attestation with a new log costs: parse, replay in every bank, derive the boot state, check
against the quoted values, evaluate the policy. Printed: the median and p95 CPU time per run.

    .venv/bin/python -m scripts.bench_eventlog [--events 1000] [--banks sha256] [--runs 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime

from harness.eventlog import (
    BootSpec,
    LogEvent,
    boot_events,
    build_log,
    image_load,
    measured,
    signing_certificate,
    uefi_variable,
)
from kbs.eventlog import EventLogCache, verify_event_log
from kbs.model import BootRecord, Node, NodeState, Policy
from kbs.policy import learn
from kbs.policy.evaluate import evaluate
from keylease.eventlog.parse import parse_event_log
from keylease.eventlog.replay import replay

EFI_GLOBAL_NAME = "Boot%04X"


def padding(n: int) -> list[LogEvent]:
    """``n`` events of the kinds a real machine's log is long with."""
    out: list[LogEvent] = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(measured(2, 0x80000004, image_load(f"\\\\PciRoot(0x0)\\\\rom{i}.efi"),
                                measure=b"driver %d" % i))  # fmt: skip
        elif kind == 1:
            name = EFI_GLOBAL_NAME % i
            out.append(measured(1, 0x80000002, uefi_variable(
                __import__("uuid").UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c"), name, b"\x01" * 40
            )))  # fmt: skip
        elif kind == 2:
            out.append(measured(8, 0xD, b"grub_cmd: insmod part_gpt %d\x00" % i))
        else:
            out.append(measured(9, 0xD, b"/boot/grub/x86_64-efi/mod%d.mod\x00" % i))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--banks", default="sha256", help="comma-separated: sha1,sha256,sha384")
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args()
    banks = tuple(args.banks.split(","))
    spec = BootSpec(
        db_certs=(signing_certificate("db"),),
        kek_certs=(signing_certificate("kek"),),
        pk_cert=signing_certificate("pk"),
        dbx_hashes=tuple(bytes([i]) * 32 for i in range(1, 40)),
    )
    events = boot_events(spec)
    events += padding(args.events - len(events))
    log = build_log(events, banks)
    parsed = parse_event_log(log)
    quoted = {b: {i: bytes(len(replay(parsed, b).get(0, b""))) for i in range(24)} for b in banks}
    for b in banks:
        quoted[b].update(replay(parsed, b))
    verified = verify_event_log(EventLogCache(), log, quoted)
    now = datetime.now(UTC)
    node = Node("n", NodeState.APPROVED, {}, "e" * 64, b"", b"", b"", {}, now, now, quoted, 1, 0)
    bank = "sha256" if "sha256" in banks else banks[0]
    document = learn.learn(node, BootRecord(verified.digest, verified.states, now), bank, None, now)
    policy = Policy("p", document, ())
    times = []
    for _ in range(args.runs):
        c0 = time.process_time()
        checked = verify_event_log(EventLogCache(), log, quoted)
        evaluate([policy], quoted, checked.states)
        times.append(time.process_time() - c0)
    times.sort()
    print(
        f"{len(parsed.events)} events, {len(log)} bytes, banks {','.join(banks)}, "
        f"{len(document.rules)} components in the policy: parse + replay + boot state + "
        f"evaluate, CPU per log: median {statistics.median(times) * 1000:.2f} ms, "
        f"p95 {times[int(len(times) * 0.95)] * 1000:.2f} ms ({args.runs} runs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

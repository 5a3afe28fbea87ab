"""The TPM's clock (TPM2_ReadClock): milliseconds the TPM has been powered, never set back by
software (TPM2_ClockSet only moves it forward), and its reset/restart counters. Approvals and the
lease are measured in it, not in the node's wall clock, which root can move."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.tpm.tss2 import command

__all__ = ["TpmClock", "read_clock"]


@dataclass(frozen=True)
class TpmClock:
    clock: int  # TPMS_CLOCK_INFO.clock, ms
    reset_count: int
    restart_count: int


def read_clock(esys: Any) -> TpmClock:
    with command("ReadClock"):
        info = esys.read_clock()
    ci = info.clockInfo
    return TpmClock(int(ci.clock), int(ci.resetCount), int(ci.restartCount))

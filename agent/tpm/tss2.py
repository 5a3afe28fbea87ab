"""The one TSS2 boundary: ``TSS2_Exception`` becomes an agent error here and only here.

- a TCTI-layer failure (the connection to the TPM went away) is ``TpmUnavailable``;
- any other failed command is ``TpmError`` naming the command and the response code;
- a release that does not import or unseal is ``ReleaseInvalid`` (policy failure: the PCRs
  changed; anything else: another TPM's EK or damage) unless the TPM itself failed;
- bytes from a file or the broker are unmarshalled strictly (no trailing bytes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tpm2_pytss import TSS2_Exception

from agent.errors import AgentError, ReleaseInvalid, TpmError, TpmUnavailable

__all__ = ["command", "rc_text", "tpm_error", "unmarshal", "unseal_error"]

_LAYER_MASK = 0xFF0000
_TCTI_LAYER = 0x0A0000
_FMT1 = 0x080  # format-1 response codes carry a handle/parameter/session number
_TPM_WARNING = 0x800  # format-0 warnings (0x9xx): object/session memory, retry, yielded, ...
_POLICY_FAIL = 0x01D  # TPM_RC_POLICY_FAIL's error number; 0x99d is "policy failed in session 1"


def rc_text(exc: TSS2_Exception) -> str:
    return f"{exc} (rc 0x{int(exc.rc):x})"


def tpm_error(command: str, exc: TSS2_Exception) -> AgentError:
    if int(exc.rc) & _LAYER_MASK == _TCTI_LAYER:
        return TpmUnavailable(f"lost the connection to the TPM during {command}: {rc_text(exc)}")
    return TpmError(f"TPM command {command} failed: {rc_text(exc)}")


@contextmanager
def command(name: str) -> Iterator[None]:
    """Translate a TSS2 failure inside the block into TpmError naming ``name``."""
    try:
        yield
    except TSS2_Exception as exc:
        raise tpm_error(name, exc) from None


def unseal_error(exc: TSS2_Exception) -> AgentError:
    """The error for a failed Import/Load/PolicyPCR/Unseal of a release."""
    rc = int(exc.rc)
    if rc & _LAYER_MASK or (not rc & _FMT1 and rc & _TPM_WARNING):
        return tpm_error("Import/Unseal", exc)
    if rc & _FMT1 and rc & 0x3F == _POLICY_FAIL:
        reason = "the PCR values differ from those it was sealed to (the boot state changed)"
    else:
        reason = f"it was made for another TPM's EK or is damaged: {rc_text(exc)}"
    return ReleaseInvalid(
        f"the release does not open in this TPM in its current PCR state: {reason}; "
        "the agent must attest again to get a new release"
    )


def unmarshal(kind: Any, data: bytes, what: str, error: type[AgentError]) -> Any:
    """Unmarshal exactly ``data`` as ``kind``; anything else raises ``error``."""
    if not data:
        raise error(f"{what} is empty")
    try:
        value, used = kind.unmarshal(data)
    except (TSS2_Exception, ValueError, TypeError) as exc:
        raise error(f"{what} is not a valid {kind.__name__}: {exc}") from None
    if used != len(data):
        raise error(f"{what} has {len(data) - used} trailing byte(s) after the {kind.__name__}")
    return value

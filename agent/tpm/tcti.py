"""Opening the TPM a TCTI string names, and flushing what a killed process left in it."""

from __future__ import annotations

import logging
from typing import Any

from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_HC, TPM2_PT, TCTILdr, TSS2_Exception

from agent.errors import TpmUnavailable
from agent.tpm.tss2 import rc_text

__all__ = ["open_esapi"]

log = logging.getLogger(__name__)

_MAX_LEFTOVERS = 64  # handles read per kind at open (a TPM holds a handful)
_OPEN_HINT = (
    "check that the TPM exists and this user may open it (device:/dev/tpmrm0 needs the tss "
    "group), or that the swtpm/mssim/tabrmd it names is running"
)


def _behind_resource_manager(name: str, conf: str) -> bool:
    """Whether a TCTI reaches the TPM through a resource manager (kernel tpmrm or tabrmd)."""
    return name == "tabrmd" or (name == "device" and "tpmrm" in conf)


def open_esapi(tcti: str) -> tuple[Any, Any]:
    """An ESAPI context and its TCTI loader for ``tcti`` ("device:/dev/tpmrm0",
    "swtpm:path=...", ...), checked to answer; the caller closes both. Raises TpmUnavailable."""
    name, _, conf = tcti.partition(":")
    if not conf and name in ("swtpm", "mssim", "device"):
        raise TpmUnavailable(
            f"TCTI {tcti!r} names no TPM (a bare {name!r} falls back to a default that may "
            "be someone else's TPM); give its path or host and port, e.g. "
            '"device:/dev/tpmrm0" or "swtpm:path=/run/swtpm/tpm.sock"'
        )
    try:
        loader = TCTILdr.parse(tcti)
    except (TSS2_Exception, RuntimeError) as exc:
        raise TpmUnavailable(f"cannot open TCTI {tcti!r}: {exc}; {_OPEN_HINT}") from None
    try:
        ectx = ESAPI(loader)
    except TSS2_Exception as exc:
        loader.close()
        raise TpmUnavailable(f"cannot open TCTI {tcti!r}: {exc}; {_OPEN_HINT}") from None
    try:
        ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.MANUFACTURER, 1)
        if not _behind_resource_manager(name, conf):
            _flush_leftovers(ectx, tcti)
    except TSS2_Exception as exc:
        ectx.close()
        loader.close()
        raise TpmUnavailable(
            f"the TPM at {tcti!r} does not answer: {rc_text(exc)}; {_OPEN_HINT}"
        ) from None
    return ectx, loader


def _flush_leftovers(esys: Any, tcti: str) -> None:
    """Flush the transient objects and sessions a killed process left behind.

    Only for a TPM without a resource manager (/dev/tpm0, an swtpm or mssim socket): there a
    dead process's handles stay and fill the three object and three session slots (0x902 /
    0x903 on every later command). Such a TPM must not be shared while the agent runs (the
    kernel lets one process open /dev/tpm0), so whatever is loaded when ours opens belongs to
    nobody alive. Behind a resource manager (/dev/tpmrm0, tabrmd) the manager flushes a dead
    process's handles itself and a new connection sees none of another's.
    """
    stale: list[int] = []
    for first in (TPM2_HC.TRANSIENT_FIRST, TPM2_HC.LOADED_SESSION_FIRST):
        _, data = esys.get_capability(TPM2_CAP.HANDLES, first, _MAX_LEFTOVERS)
        stale.extend(int(h) for h in data.data.handles)
    flushed = 0
    for handle in stale:
        try:
            esys.flush_context(esys.tr_from_tpmpublic(handle))
            flushed += 1
        except TSS2_Exception as exc:
            log.warning("could not flush handle 0x%08x left in the TPM: %s", handle, exc)
    if flushed:
        log.warning(
            "flushed %d transient object(s)/session(s) left in the TPM at %s by a process "
            "that ended without flushing them; with a resource manager "
            '(TCTI "device:/dev/tpmrm0") this cannot happen',
            flushed,
            tcti,
        )

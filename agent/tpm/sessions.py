"""Policy sessions and flushing: every session and transient handle is flushed in ``finally``.

A TPM without a resource manager has 3 object and 3 session slots: at most one session is open
at a time here, and a handle that cannot be flushed is logged (it may stay loaded).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPMT_SYM_DEF, TSS2_Exception

from agent.tpm.tss2 import command

__all__ = ["endorsement_session", "flush", "policy_session"]

log = logging.getLogger(__name__)


def flush(esys: Any, handle: Any) -> None:
    try:
        esys.flush_context(handle)
    except TSS2_Exception as exc:
        log.warning("could not flush a TPM handle (it may stay loaded): %s", exc)


@contextmanager
def policy_session(esys: Any) -> Iterator[Any]:
    """A fresh SHA-256 policy session, flushed on exit."""
    with command("StartAuthSession"):
        session = esys.start_auth_session(
            tpm_key=ESYS_TR.NONE,
            bind=ESYS_TR.NONE,
            session_type=TPM2_SE.POLICY,
            symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            auth_hash=TPM2_ALG.SHA256,
        )
    try:
        yield session
    finally:
        flush(esys, session)


@contextmanager
def endorsement_session(esys: Any) -> Iterator[Any]:
    """A policy session satisfying the EK's authPolicy: PolicySecret(ENDORSEMENT)."""
    with policy_session(esys) as session:
        with command("PolicySecret"):
            esys.policy_secret(ESYS_TR.ENDORSEMENT, session)
        yield session

"""``Tpm``: one open TPM, and every command the agent asks of it.

Each method checks the TPM is still open and hands its ESAPI context and EK to the module of its
concern (``identity``, ``quote``, ``unseal``); values in and out are bytes and frozen dataclasses.
One ``Tpm`` per thread (ESAPI is not thread-safe).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.blobs import AkBlobs, EkInfo, Quote
from agent.errors import TpmError
from agent.tpm.authorized import unseal_authorized
from agent.tpm.clock import TpmClock, read_clock
from agent.tpm.identity import EndorsementKey, activate_credential, create_ak
from agent.tpm.quote import extend_pcr, quote, read_pcrs
from agent.tpm.tcti import open_esapi
from agent.tpm.unseal import unseal_import
from keylease.api.v1 import SealedImport
from keylease.api.v1.approvals import Approval
from keylease.secret import Secret

__all__ = ["Tpm"]


class Tpm:
    """One open TPM. Use ``with Tpm.open(tcti) as tpm:``; the ESAPI context closes on exit."""

    def __init__(self, ectx: Any, tcti: Any, name: str) -> None:
        self._ectx = ectx
        self._tcti = tcti
        self._name = name
        self._ek = EndorsementKey(ectx)

    @classmethod
    def open(cls, tcti: str) -> Tpm:
        """Open the TPM named by a TCTI string ("device:/dev/tpmrm0", "swtpm:path=...", ...)."""
        ectx, loader = open_esapi(tcti)
        return cls(ectx, loader, tcti)

    def close(self) -> None:
        if self._ectx is None:
            return
        try:
            self._ek.close()
        finally:
            self._ectx.close()
            self._ectx = None
            self._tcti.close()

    def __enter__(self) -> Tpm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tpm({self._name!r})"

    def _opened(self) -> tuple[Any, EndorsementKey]:
        """The ESAPI context and the EK; TpmError once the TPM was closed."""
        if self._ectx is None:
            raise TpmError(f"the TPM at {self._name!r} was already closed")
        return self._ectx, self._ek

    # --- EK and AK --------------------------------------------------------------------------

    def read_ek(self) -> EkInfo:
        """The EK certificate (DER: RSA-2048, else ECC P-256) and the public area of its EK."""
        _, ek = self._opened()
        return ek.info()

    def create_ak(self) -> AkBlobs:
        """Create an ECC P-256 restricted signing key (ECDSA-SHA256) under the EK."""
        return create_ak(*self._opened())

    def activate_credential(
        self, ak: AkBlobs, credential_blob: bytes, encrypted_secret: bytes
    ) -> Secret:
        """Recover the broker's challenge secret; only the TPM holding the EK and AK can."""
        return activate_credential(*self._opened(), ak, credential_blob, encrypted_secret)

    # --- quote and PCRs ---------------------------------------------------------------------

    def quote(self, ak: AkBlobs, qualifying_data: bytes) -> Quote:
        """TPM2_Quote over PCRs 0-23 of every active bank (sha1, sha256, sha384) with the AK's
        own scheme, plus the PCR values (read right after the quote, checked against it)."""
        return quote(*self._opened(), ak, qualifying_data)

    def read_pcrs(self, bank: str, indices: Sequence[int]) -> dict[int, bytes]:
        """PCR values of one bank, keyed by index."""
        esys, _ = self._opened()
        return read_pcrs(esys, bank, indices)

    def clock(self) -> TpmClock:
        """The TPM's clock (ms powered on) and reset/restart counters (TPM2_ReadClock)."""
        esys, _ = self._opened()
        return read_clock(esys)

    def extend_pcr(self, index: int, data: bytes) -> None:
        """Extend PCR ``index`` of every active bank with that bank's hash of ``data``."""
        esys, _ = self._opened()
        extend_pcr(esys, index, data)

    # --- release ----------------------------------------------------------------------------

    def unseal_import(self, sealed: SealedImport) -> Secret:
        """Import a sealed object duplicated to this TPM's EK and unseal it under PolicyPCR.

        Raises ReleaseInvalid when the blobs are malformed, were made for another TPM's EK, or
        the PCRs no longer hold the sealed values; TpmError/TpmUnavailable when the TPM fails.
        """
        return unseal_import(*self._opened(), sealed)

    def unseal_authorized(
        self, sealed: SealedImport, approval: Approval, key: ec.EllipticCurvePublicKey
    ) -> Secret:
        """Import a sealed object bound to PolicyAuthorize by ``key`` and unseal it under the
        broker's ``approval`` (its PCR values, its TPM-clock limit, its node and policy group).

        Raises ReleaseInvalid naming the step the TPM refused; TpmError/TpmUnavailable when the
        TPM fails.
        """
        return unseal_authorized(*self._opened(), sealed, approval, key)

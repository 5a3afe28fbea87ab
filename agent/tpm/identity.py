"""The TPM's identity: the EK (with its certificate) and the AK created under it.

The EK is the RSA-2048 one when the TPM holds its certificate (NV 0x01c00002), else the ECC
P-256 one (certificate at NV 0x01c0000a): the TCG EK profile's low-range templates, which every
TPM that has those certificates can recreate. The EK is the parent of every object the agent
loads: the persistent EK (0x81010001 RSA, 0x81010002 ECC) when it is exactly the key the EK
template creates (checked once per open TPM; it spares an RSA CreatePrimary per command,
seconds on some hardware TPMs), else a fresh primary flushed after use. The AK is an ECC P-256
restricted signing key (ECDSA-SHA256); its blobs are kept by the caller and loaded for each use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tpm2_pytss import (
    ESYS_TR,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPMT_PUBLIC,
    TSS2_Exception,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

from agent.blobs import AkBlobs, EkInfo
from agent.errors import TpmError
from agent.tpm.sessions import endorsement_session, flush
from agent.tpm.tss2 import command, tpm_error, unmarshal
from keylease.secret import Secret

__all__ = ["EndorsementKey", "activate_credential", "create_ak", "loaded_ak"]

log = logging.getLogger(__name__)

# (template name, certificate NV index, persistent handle, description), in order of preference
EK_KINDS = (
    ("EK-RSA2048", 0x01C00002, 0x81010001, "RSA-2048"),
    ("EK-ECC256", 0x01C0000A, 0x81010002, "ECC P-256"),
)

_AK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)


class EndorsementKey:
    """The EK of one open ESAPI context; ``close()`` before the context closes."""

    def __init__(self, esys: Any) -> None:
        self._esys = esys
        self._template: Any = None
        self._certificate: bytes | None = None
        self._persistent: Any = None  # ESYS_TR of the persistent EK once it proved to be ours
        self._handle = 0
        self._checked = False

    def info(self) -> EkInfo:
        """The EK certificate (DER) and the public area of the EK it certifies."""
        cert, _ = self._read_template()
        handle, public = self._create()
        flush(self._esys, handle)
        return EkInfo(certificate=cert, public=public.marshal())

    @contextmanager
    def parent(self) -> Iterator[Any]:
        """The EK as a parent: the matching persistent EK, else a fresh primary flushed after."""
        if not self._checked:
            self._persistent = self._find_persistent()
            self._checked = True
        if self._persistent is not None:
            yield self._persistent
            return
        handle, _ = self._create()
        try:
            yield handle
        finally:
            flush(self._esys, handle)

    def close(self) -> None:
        """Release the persistent EK's ESYS_TR (the key itself stays in the TPM)."""
        try:
            if self._persistent is not None:
                self._esys.tr_close(self._persistent)
        except TSS2_Exception as exc:
            log.debug("closing the EK handle failed: %s", exc)
        finally:
            self._persistent = None

    def _read_template(self) -> tuple[bytes, Any]:
        if self._template is None:
            for name, _index, handle, _what in EK_KINDS:
                try:
                    cert, template = create_ek_template(name, NVReadEK(self._esys))
                except TSS2_Exception as exc:
                    raise tpm_error("NV_Read (EK certificate and template)", exc) from None
                if cert:
                    self._certificate, self._template, self._handle = bytes(cert), template, handle
                    break
            else:
                where = " or ".join(f"{what} at NV 0x{index:08x}" for _, index, _, what in EK_KINDS)
                raise TpmError(
                    f"the TPM has no EK certificate ({where}); it cannot be enrolled (for "
                    "swtpm, provision it with swtpm_setup --create-ek-cert)"
                )
        assert self._certificate is not None
        return self._certificate, self._template

    def _create(self) -> tuple[Any, Any]:
        _, template = self._read_template()
        with command("CreatePrimary (EK)"):
            handle, public, *_ = self._esys.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
            )
        return handle, public

    def _find_persistent(self) -> Any:
        """ESYS_TR of the persistent EK handle if it is exactly the EK the template creates,
        else None."""
        handle, created = self._create()
        flush(self._esys, handle)
        try:
            persistent = self._esys.tr_from_tpmpublic(self._handle)
        except TSS2_Exception:
            return None
        with command("ReadPublic (EK)"):
            public, _, _ = self._esys.read_public(persistent)
        if public.marshal() == created.marshal():
            return persistent
        with command("TR_Close"):
            self._esys.tr_close(persistent)
        return None


def create_ak(esys: Any, ek: EndorsementKey) -> AkBlobs:
    """Create an ECC P-256 restricted signing key (ECDSA-SHA256) under the EK."""
    template = TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC.parse(
            "ecc256:ecdsa-sha256:null", objectAttributes=_AK_ATTRIBUTES, nameAlg="sha256"
        )
    )
    with ek.parent() as parent, endorsement_session(esys) as session, command("Create (AK)"):
        private, public, *_ = esys.create(
            parent, TPM2B_SENSITIVE_CREATE(), template, session1=session
        )
    return AkBlobs(public=public.marshal(), private=private.marshal())


@contextmanager
def loaded_ak(esys: Any, ek: EndorsementKey, ak: AkBlobs) -> Iterator[Any]:
    """The AK loaded under the EK, flushed on exit."""
    public = unmarshal(TPM2B_PUBLIC, ak.public, "the AK public blob", TpmError)
    private = unmarshal(TPM2B_PRIVATE, ak.private, "the AK private blob", TpmError)
    with ek.parent() as parent, endorsement_session(esys) as session, command("Load (AK)"):
        handle = esys.load(parent, private, public, session1=session)
    try:
        yield handle
    finally:
        flush(esys, handle)


def activate_credential(
    esys: Any, ek: EndorsementKey, ak: AkBlobs, credential_blob: bytes, encrypted_secret: bytes
) -> Secret:
    """Recover the broker's challenge secret; only the TPM holding the EK and AK can."""
    blob = unmarshal(TPM2B_ID_OBJECT, credential_blob, "the credential blob", TpmError)
    secret = unmarshal(TPM2B_ENCRYPTED_SECRET, encrypted_secret, "the encrypted secret", TpmError)
    with (
        loaded_ak(esys, ek, ak) as ak_handle,
        ek.parent() as parent,
        endorsement_session(esys) as session,
        command("ActivateCredential"),
    ):
        digest = esys.activate_credential(
            ak_handle, parent, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
        )
    return Secret(bytes(digest))

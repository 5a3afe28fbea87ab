"""A bench-only TPM facade: one swtpm carrying many node identities (fleet benchmark).

Each identity has its own EK: the standard ECC P-256 EK template (TCG EK profile, low range)
with a distinct ``unique.x``, created with CreatePrimary in the endorsement hierarchy, so each is
a different key; the EK's certificate comes from ``scripts.fleet_ca``. Each identity's AK is an
ECC P-256 restricted signing key created under its own EK. After credential activation the AK's
context is saved (TPM2_ContextSave); a quote then costs ContextLoad + Quote + FlushContext, with
no EK in the TPM. Saved contexts die at a TPM reset: the benchmark never restarts its swtpms.

Not thread-safe (one ESAPI context); use one ``FleetTpm`` per process. ``agent.tpm.Tpm`` is the
real agent facade; it only knows the TPM's one standard EK.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_SE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPML_PCR_SELECTION,
    TPMS_CONTEXT,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TCTILdr,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

__all__ = ["QUOTE_PCRS", "FleetTpm", "Identity"]

QUOTE_PCRS = tuple(range(24))
_AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA  # swtpm stopped without TPM2_Shutdown must not end in DA lockout
)


@dataclass(frozen=True)
class Identity:
    unique: bytes  # the EK template's unique.x: which EK
    ek_public: bytes  # marshalled TPM2B_PUBLIC
    ak_public: bytes
    ak_private: bytes


class FleetTpm:
    def __init__(self, tcti: str) -> None:
        if not tcti.startswith("swtpm:path="):
            raise ValueError("FleetTpm takes an explicit swtpm:path=... TCTI")
        self._tcti = TCTILdr.parse(tcti)
        self._ectx = ESAPI(self._tcti)
        _, self._template = create_ek_template("EK-ECC256", NVReadEK(self._ectx))
        self._pcrs: dict[int, bytes] | None = None

    def close(self) -> None:
        self._ectx.close()
        self._tcti.close()

    def __enter__(self) -> FleetTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _flushed(self, handle: Any) -> Iterator[Any]:
        try:
            yield handle
        finally:
            self._ectx.flush_context(handle)

    @contextmanager
    def _eh_session(self) -> Iterator[Any]:
        session = self._ectx.start_auth_session(
            tpm_key=ESYS_TR.NONE,
            bind=ESYS_TR.NONE,
            session_type=TPM2_SE.POLICY,
            symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            auth_hash=TPM2_ALG.SHA256,
        )
        with self._flushed(session):
            self._ectx.policy_secret(ESYS_TR.ENDORSEMENT, session)
            yield session

    def _ek(self, unique: bytes) -> tuple[Any, Any]:
        template = TPM2B_PUBLIC.unmarshal(bytes(self._template.marshal()))[0]
        template.publicArea.unique.ecc.x = unique
        handle, public, *_ = self._ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        return handle, public

    def create_identity(self, index: int) -> Identity:
        unique = hashlib.sha256(f"keylease-fleet-ek-{index}".encode()).digest()
        ek, ek_public = self._ek(unique)
        template = TPM2B_PUBLIC(
            publicArea=TPMT_PUBLIC.parse(
                "ecc256:ecdsa-sha256:null", objectAttributes=_AK_ATTRIBUTES, nameAlg="sha256"
            )
        )
        with self._flushed(ek), self._eh_session() as session:
            private, public, *_ = self._ectx.create(
                ek, TPM2B_SENSITIVE_CREATE(), template, session1=session
            )
        return Identity(
            unique=unique,
            ek_public=bytes(ek_public.marshal()),
            ak_public=bytes(public.marshal()),
            ak_private=bytes(private.marshal()),
        )

    def activate(
        self, ident: Identity, credential_blob: bytes, encrypted_secret: bytes
    ) -> tuple[bytes, bytes]:
        """ActivateCredential; returns (the recovered secret, the AK's saved context)."""
        blob = TPM2B_ID_OBJECT.unmarshal(credential_blob)[0]
        secret = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)[0]
        ek, _ = self._ek(ident.unique)
        with self._flushed(ek):
            with self._eh_session() as session:
                ak = self._ectx.load(
                    ek,
                    TPM2B_PRIVATE.unmarshal(ident.ak_private)[0],
                    TPM2B_PUBLIC.unmarshal(ident.ak_public)[0],
                    session1=session,
                )
            with self._flushed(ak):
                with self._eh_session() as session:
                    digest = self._ectx.activate_credential(
                        ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
                    )
                context = self._ectx.context_save(ak)
        return bytes(digest), bytes(context.marshal())

    def pcrs(self) -> dict[int, bytes]:
        """sha256 PCRs 0-23 (read once: nothing extends the benchmark's PCRs)."""
        if self._pcrs is None:
            values: dict[int, bytes] = {}
            for start in range(0, len(QUOTE_PCRS), 8):
                chunk = QUOTE_PCRS[start : start + 8]
                sel = TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, chunk)))
                _, _, digests = self._ectx.pcr_read(sel)
                for i, d in zip(chunk, digests, strict=True):
                    values[i] = bytes(d)
            self._pcrs = values
        return self._pcrs

    def quote(self, ak_context: bytes, qualifying_data: bytes) -> tuple[bytes, bytes]:
        """(marshalled TPM2B_ATTEST, marshalled TPMT_SIGNATURE) over sha256 PCRs 0-23."""
        ak = self._ectx.context_load(TPMS_CONTEXT.unmarshal(ak_context)[0])
        with self._flushed(ak):
            attest, signature = self._ectx.quote(
                ak,
                TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, QUOTE_PCRS))),
                qualifying_data,
                TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                session1=ESYS_TR.PASSWORD,
            )
        return bytes(attest.marshal()), bytes(signature.marshal())

"""The agent's one typed facade over the TPM (tpm2-pytss ESAPI).

Everything the agent asks of the TPM goes through ``Tpm``: the EK and its certificate, the AK
(ECC P-256, restricted signing, created under the EK), credential activation, quotes, PCRs, and
opening a release (import under the EK + PolicyPCR unseal). Values in and out are bytes and
frozen dataclasses; ESAPI handles never leave this module.

Resource rules (a TPM without a resource manager has 3 object and 3 session slots): at most the
EK and one child object are loaded at a time, at most one session is open, and every session and
transient handle is flushed in ``finally``; what a killed process left behind is flushed at open.
TSS2 errors become agent errors here and only here.
One ``Tpm`` per thread (ESAPI is not thread-safe).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn

from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_PT,
    TPM2_SE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_HA,
    TCTILdr,
    TSS2_Exception,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

from agent.errors import AgentError, ReleaseInvalid, TpmError, TpmUnavailable
from keylease.api.v1 import SealedImport
from keylease.secret import Secret

__all__ = ["AkBlobs", "EkInfo", "Quote", "SealedImport", "Tpm"]

log = logging.getLogger(__name__)

EK_TEMPLATE = "EK-RSA2048"
EK_CERT_NV_INDEX = 0x01C00002
EK_PERSISTENT_HANDLE = 0x81010001
QUOTE_BANK = "sha256"
QUOTE_PCRS = tuple(range(24))
MAX_QUALIFYING_DATA = 64
PCR_READ_CHUNK = 8  # TPM2_PCR_Read returns at most 8 PCRs per call
QUOTE_ATTEMPTS = 3

_BANKS = ("sha1", "sha256", "sha384", "sha512")
_AK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)
_MAX_LEFTOVERS = 64  # handles read per kind at open (a TPM holds a handful)
_LAYER_MASK = 0xFF0000
_TCTI_LAYER = 0x0A0000
_FMT1 = 0x080  # format-1 response codes carry a handle/parameter/session number
_TPM_WARNING = 0x800  # format-0 warnings (0x9xx): object/session memory, retry, yielded, ...
_POLICY_FAIL = 0x01D  # TPM_RC_POLICY_FAIL's error number; 0x99d is "policy failed in session 1"
_OPEN_HINT = (
    "check that the TPM exists and this user may open it (device:/dev/tpmrm0 needs the tss "
    "group), or that the swtpm/mssim/tabrmd it names is running"
)


@dataclass(frozen=True)
class AkBlobs:
    public: bytes  # marshalled TPM2B_PUBLIC
    private: bytes  # marshalled TPM2B_PRIVATE (wrapped by the TPM; useless elsewhere)


@dataclass(frozen=True)
class EkInfo:
    certificate: bytes  # DER from NV 0x01c00002 (RSA-2048 EK certificate)
    public: bytes  # marshalled TPM2B_PUBLIC of the RSA-2048 EK


@dataclass(frozen=True)
class Quote:
    attest: bytes  # marshalled TPM2B_ATTEST as TPM2_Quote returned it
    signature: bytes  # marshalled TPMT_SIGNATURE
    pcr_bank: str
    pcrs: Mapping[int, bytes]  # the quoted PCR values, read right after the quote


def _behind_resource_manager(name: str, conf: str) -> bool:
    """Whether a TCTI reaches the TPM through a resource manager (kernel tpmrm or tabrmd)."""
    return name == "tabrmd" or (name == "device" and "tpmrm" in conf)


# --- error translation (the one TSS2 boundary) ----------------------------------------------


def _rc_text(exc: TSS2_Exception) -> str:
    return f"{exc} (rc 0x{int(exc.rc):x})"


def _tpm_error(command: str, exc: TSS2_Exception) -> AgentError:
    if int(exc.rc) & _LAYER_MASK == _TCTI_LAYER:
        return TpmUnavailable(f"lost the connection to the TPM during {command}: {_rc_text(exc)}")
    return TpmError(f"TPM command {command} failed: {_rc_text(exc)}")


@contextmanager
def _command(name: str) -> Iterator[None]:
    """Translate a TSS2 failure inside the block into TpmError naming ``name``."""
    try:
        yield
    except TSS2_Exception as exc:
        raise _tpm_error(name, exc) from None


def _unmarshal(kind: Any, data: bytes, what: str, error: type[AgentError]) -> Any:
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


def _selection(bank: str, indices: Sequence[int]) -> Any:
    return TPML_PCR_SELECTION.parse(f"{bank}:{','.join(str(i) for i in indices)}")


def _selected(selection: Any) -> list[int]:
    """PCR indices of a one-bank TPML_PCR_SELECTION, in ascending order."""
    indices: list[int] = []
    for n in range(int(selection.count)):
        sel = selection.pcrSelections[n]
        bitmap = bytes(sel.pcrSelect)[: int(sel.sizeofSelect)]
        indices += [8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1]
    return sorted(indices)


class Tpm:
    """One open TPM. Use ``with Tpm.open(tcti) as tpm:``; the ESAPI context closes on exit."""

    def __init__(self, ectx: Any, tcti: Any, name: str) -> None:
        self._ectx = ectx
        self._tcti = tcti
        self._name = name
        self._ek_template: Any = None
        self._ek_certificate: bytes | None = None
        self._ek_persistent: Any = None  # ESYS_TR of 0x81010001 once it proved to be our EK
        self._ek_checked = False

    @classmethod
    def open(cls, tcti: str) -> Tpm:
        """Open the TPM named by a TCTI string ("device:/dev/tpmrm0", "swtpm:path=...", ...)."""
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
        tpm = cls(ectx, loader, tcti)
        try:
            ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.MANUFACTURER, 1)
            if not _behind_resource_manager(name, conf):
                tpm._flush_leftovers()
        except TSS2_Exception as exc:
            tpm.close()
            raise TpmUnavailable(
                f"the TPM at {tcti!r} does not answer: {_rc_text(exc)}; {_OPEN_HINT}"
            ) from None
        return tpm

    def _flush_leftovers(self) -> None:
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
            _, data = self._esys.get_capability(TPM2_CAP.HANDLES, first, _MAX_LEFTOVERS)
            stale.extend(int(h) for h in data.data.handles)
        flushed = 0
        for handle in stale:
            try:
                self._esys.flush_context(self._esys.tr_from_tpmpublic(handle))
                flushed += 1
            except TSS2_Exception as exc:
                log.warning("could not flush handle 0x%08x left in the TPM: %s", handle, exc)
        if flushed:
            log.warning(
                "flushed %d transient object(s)/session(s) left in the TPM at %s by a process "
                "that ended without flushing them; with a resource manager "
                '(TCTI "device:/dev/tpmrm0") this cannot happen',
                flushed,
                self._name,
            )

    def close(self) -> None:
        if self._ectx is None:
            return
        try:
            if self._ek_persistent is not None:
                self._ectx.tr_close(self._ek_persistent)
        except TSS2_Exception as exc:
            log.debug("closing the EK handle failed: %s", exc)
        finally:
            self._ek_persistent = None
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

    # --- handles and sessions ---------------------------------------------------------------

    @property
    def _esys(self) -> Any:
        if self._ectx is None:
            raise TpmError(f"the TPM at {self._name!r} was already closed")
        return self._ectx

    def _flush(self, handle: Any) -> None:
        try:
            self._esys.flush_context(handle)
        except TSS2_Exception as exc:
            log.warning("could not flush a TPM handle (it may stay loaded): %s", exc)

    @contextmanager
    def _session(self) -> Iterator[Any]:
        """A fresh SHA-256 policy session, flushed on exit."""
        with _command("StartAuthSession"):
            session = self._esys.start_auth_session(
                tpm_key=ESYS_TR.NONE,
                bind=ESYS_TR.NONE,
                session_type=TPM2_SE.POLICY,
                symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                auth_hash=TPM2_ALG.SHA256,
            )
        try:
            yield session
        finally:
            self._flush(session)

    @contextmanager
    def _endorsement_session(self) -> Iterator[Any]:
        """A policy session satisfying the EK's authPolicy: PolicySecret(ENDORSEMENT)."""
        with self._session() as session:
            with _command("PolicySecret"):
                self._esys.policy_secret(ESYS_TR.ENDORSEMENT, session)
            yield session

    def _read_ek_template(self) -> tuple[bytes, Any]:
        if self._ek_template is None:
            try:
                cert, template = create_ek_template(EK_TEMPLATE, NVReadEK(self._esys))
            except TSS2_Exception as exc:
                raise _tpm_error("NV_Read (EK certificate and template)", exc) from None
            if not cert:
                raise TpmError(
                    f"the TPM has no RSA-2048 EK certificate at NV 0x{EK_CERT_NV_INDEX:08x}; "
                    "it cannot be enrolled (for swtpm, provision it with swtpm_setup "
                    "--create-ek-cert)"
                )
            self._ek_certificate = bytes(cert)
            self._ek_template = template
        assert self._ek_certificate is not None
        return self._ek_certificate, self._ek_template

    def _create_ek(self) -> tuple[Any, Any]:
        _, template = self._read_ek_template()
        with _command("CreatePrimary (EK)"):
            handle, public, *_ = self._esys.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
            )
        return handle, public

    def _find_persistent_ek(self) -> Any:
        """ESYS_TR of 0x81010001 if it is exactly the EK the template creates, else None.

        Checked once per ``Tpm``; reusing it spares an RSA CreatePrimary per command (seconds
        on some hardware TPMs).
        """
        handle, created = self._create_ek()
        self._flush(handle)
        try:
            persistent = self._esys.tr_from_tpmpublic(EK_PERSISTENT_HANDLE)
        except TSS2_Exception:
            return None
        with _command("ReadPublic (EK)"):
            public, _, _ = self._esys.read_public(persistent)
        if public.marshal() == created.marshal():
            return persistent
        with _command("TR_Close"):
            self._esys.tr_close(persistent)
        return None

    @contextmanager
    def _ek(self) -> Iterator[Any]:
        """The EK as a parent: the matching persistent EK, else a fresh primary flushed after."""
        if not self._ek_checked:
            self._ek_persistent = self._find_persistent_ek()
            self._ek_checked = True
        if self._ek_persistent is not None:
            yield self._ek_persistent
            return
        handle, _ = self._create_ek()
        try:
            yield handle
        finally:
            self._flush(handle)

    @contextmanager
    def _loaded_ak(self, ak: AkBlobs) -> Iterator[Any]:
        public = _unmarshal(TPM2B_PUBLIC, ak.public, "the AK public blob", TpmError)
        private = _unmarshal(TPM2B_PRIVATE, ak.private, "the AK private blob", TpmError)
        with self._ek() as ek, self._endorsement_session() as session, _command("Load (AK)"):
            handle = self._esys.load(ek, private, public, session1=session)
        try:
            yield handle
        finally:
            self._flush(handle)

    # --- EK and AK --------------------------------------------------------------------------

    def read_ek(self) -> EkInfo:
        """The RSA-2048 EK certificate (DER) and the public area of the EK it certifies."""
        cert, _ = self._read_ek_template()
        handle, public = self._create_ek()
        self._flush(handle)
        return EkInfo(certificate=cert, public=public.marshal())

    def create_ak(self) -> AkBlobs:
        """Create an ECC P-256 restricted signing key (ECDSA-SHA256) under the EK."""
        template = TPM2B_PUBLIC(
            publicArea=TPMT_PUBLIC.parse(
                "ecc256:ecdsa-sha256:null", objectAttributes=_AK_ATTRIBUTES, nameAlg="sha256"
            )
        )
        with self._ek() as ek, self._endorsement_session() as session, _command("Create (AK)"):
            private, public, *_ = self._esys.create(
                ek, TPM2B_SENSITIVE_CREATE(), template, session1=session
            )
        return AkBlobs(public=public.marshal(), private=private.marshal())

    def activate_credential(
        self, ak: AkBlobs, credential_blob: bytes, encrypted_secret: bytes
    ) -> Secret:
        """Recover the broker's challenge secret; only the TPM holding the EK and AK can."""
        blob = _unmarshal(TPM2B_ID_OBJECT, credential_blob, "the credential blob", TpmError)
        secret = _unmarshal(
            TPM2B_ENCRYPTED_SECRET, encrypted_secret, "the encrypted secret", TpmError
        )
        with (
            self._loaded_ak(ak) as ak_handle,
            self._ek() as ek,
            self._endorsement_session() as session,
            _command("ActivateCredential"),
        ):
            digest = self._esys.activate_credential(
                ak_handle, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
            )
        return Secret(bytes(digest))

    # --- quote and PCRs ---------------------------------------------------------------------

    def quote(self, ak: AkBlobs, qualifying_data: bytes) -> Quote:
        """TPM2_Quote over sha256 PCRs 0-23 with the AK's own scheme, plus the PCR values.

        The values are read right after the quote and checked against the signed digest; if a
        PCR moved in between, the quote is taken again.
        """
        if len(qualifying_data) > MAX_QUALIFYING_DATA:
            raise TpmError(f"qualifying data is {len(qualifying_data)} bytes; at most 64 fit")
        with self._loaded_ak(ak) as ak_handle:
            for _ in range(QUOTE_ATTEMPTS):
                with _command("Quote"):
                    attest, signature = self._esys.quote(
                        ak_handle,
                        _selection(QUOTE_BANK, QUOTE_PCRS),
                        qualifying_data,
                        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                        session1=ESYS_TR.PASSWORD,
                    )
                pcrs = self.read_pcrs(QUOTE_BANK, QUOTE_PCRS)
                digest = hashlib.sha256(b"".join(pcrs[i] for i in QUOTE_PCRS)).digest()
                signed, _ = TPMS_ATTEST.unmarshal(bytes(attest))
                if bytes(signed.attested.quote.pcrDigest) == digest:
                    return Quote(
                        attest=attest.marshal(),
                        signature=signature.marshal(),
                        pcr_bank=QUOTE_BANK,
                        pcrs=pcrs,
                    )
                log.info("a PCR changed while quoting; quoting again")
        raise TpmError("PCRs kept changing while quoting; try again once boot has settled")

    def read_pcrs(self, bank: str, indices: Sequence[int]) -> dict[int, bytes]:
        """PCR values of one bank, keyed by index."""
        if bank not in _BANKS:
            raise TpmError(f"unknown PCR bank {bank!r}; use one of {', '.join(_BANKS)}")
        wanted = sorted(set(indices))
        if any(not 0 <= i < 24 for i in wanted):
            raise TpmError(f"PCR indices must be 0-23, got {list(indices)}")
        values: dict[int, bytes] = {}
        pending = wanted
        while pending:
            with _command("PCR_Read"):
                _, selection, digests = self._esys.pcr_read(
                    _selection(bank, pending[:PCR_READ_CHUNK])
                )
            got = _selected(selection)
            if not got:
                raise TpmError(f"the TPM has no active {bank} PCR bank (PCRs {pending})")
            for index, digest in zip(got, digests, strict=True):
                values[index] = bytes(digest)
            pending = [i for i in pending if i not in values]
        return values

    def extend_pcr(self, index: int, data: bytes) -> None:
        """Extend sha256 PCR ``index`` with SHA-256(data)."""
        if not 0 <= index < 24:
            raise TpmError(f"PCR index must be 0-23, got {index}")
        digest = TPMU_HA(sha256=hashlib.sha256(data).digest())
        digests = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=digest)])
        with _command("PCR_Extend"):
            self._esys.pcr_extend(ESYS_TR(ESYS_TR.PCR0 + index), digests, session1=ESYS_TR.PASSWORD)

    # --- release ----------------------------------------------------------------------------

    def unseal_import(self, sealed: SealedImport) -> Secret:
        """Import a sealed object duplicated to this TPM's EK and unseal it under PolicyPCR.

        Raises ReleaseInvalid when the blobs are malformed, were made for another TPM's EK, or
        the PCRs no longer hold the sealed values; TpmError/TpmUnavailable when the TPM fails.
        """
        indices = _check_indices(sealed)
        public = _unmarshal(TPM2B_PUBLIC, sealed.sealed_public, "sealed_public", ReleaseInvalid)
        duplicate = _unmarshal(TPM2B_PRIVATE, sealed.duplicate, "duplicate", ReleaseInvalid)
        seed = _unmarshal(TPM2B_ENCRYPTED_SECRET, sealed.in_sym_seed, "in_sym_seed", ReleaseInvalid)
        area = public.publicArea
        if area.type != TPM2_ALG.KEYEDHASH or area.objectAttributes & TPMA_OBJECT.USERWITHAUTH:
            raise ReleaseInvalid("the sealed object is not a policy-only sealed data object")
        try:
            with self._ek() as ek:
                with self._endorsement_session() as session:
                    private = self._esys.import_(
                        ek,
                        b"",
                        public,
                        duplicate,
                        seed,
                        TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                        session1=session,
                    )
                with self._endorsement_session() as session:
                    handle = self._esys.load(ek, private, public, session1=session)
                try:
                    with self._session() as session:
                        self._esys.policy_pcr(session, b"", _selection(sealed.pcr_bank, indices))
                        data = self._esys.unseal(handle, session1=session)
                finally:
                    self._flush(handle)
        except TSS2_Exception as exc:
            _release_error(exc)
        return Secret(bytes(data))


def _check_indices(sealed: SealedImport) -> tuple[int, ...]:
    if sealed.pcr_bank != QUOTE_BANK:
        raise ReleaseInvalid(
            f"the release is sealed to PCR bank {sealed.pcr_bank[:32]!r}, not sha256"
        )
    indices = tuple(sealed.pcr_indices)
    if not indices:
        raise ReleaseInvalid("the release is not bound to any PCR; refusing it")
    if list(indices) != sorted(set(indices)) or any(not 0 <= i < 24 for i in indices):
        raise ReleaseInvalid(f"the release names invalid PCR indices {list(indices)}")
    return indices


def _release_error(exc: TSS2_Exception) -> NoReturn:
    rc = int(exc.rc)
    if rc & _LAYER_MASK or (not rc & _FMT1 and rc & _TPM_WARNING):
        raise _tpm_error("Import/Unseal", exc) from None
    if rc & _FMT1 and rc & 0x3F == _POLICY_FAIL:
        reason = "the PCR values differ from those it was sealed to (the boot state changed)"
    else:
        reason = f"it was made for another TPM's EK or is damaged: {_rc_text(exc)}"
    raise ReleaseInvalid(
        f"the release does not open in this TPM in its current PCR state: {reason}; "
        "the agent must attest again to get a new release"
    ) from None

"""The broker's one error root, and every error class the broker raises.

Every error carries operator-facing text; verification failures are specific subclasses so that
tests and audit records name exactly what failed. Errors know no transport: each servicer maps
every class to a gRPC status code in one table (``kbs.status``, for the node service and the
admin API), and the command line maps them to exit codes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ActivationFailed",
    "AdminAccessDenied",
    "AdminUnavailable",
    "AkAttributesInvalid",
    "AttestationFailed",
    "ConfigError",
    "CounterRollback",
    "DatabaseUnavailable",
    "EkCertificateMalformed",
    "EkPublicMismatch",
    "EnrollmentRefused",
    "EventLogInvalid",
    "EventLogMismatch",
    "EventLogMissing",
    "FeedClosed",
    "IncorrectSignature",
    "InvalidRequest",
    "KbsError",
    "NoPolicy",
    "NodeEkConflict",
    "NodeNotApproved",
    "NodeRevoked",
    "NonceExpired",
    "NonceUnknown",
    "NotAllowlisted",
    "NotFound",
    "NotGranted",
    "OperatorError",
    "PcrDigestMismatch",
    "PcrSelectionMismatch",
    "PolicyDenied",
    "QualifyingDataMismatch",
    "QuoteInvalid",
    "QuoteStructureInvalid",
    "RevocationNotShared",
    "RevocationsUnreadable",
    "StoreConflict",
    "StoreError",
    "TooManyWatchers",
    "UnknownNode",
    "UntrustedEk",
]


class KbsError(Exception):
    """Root of every error the broker raises on purpose."""

    def diagnostics(self) -> str:
        """Text for the operator: what went wrong and what to do."""
        return str(self)


class ConfigError(KbsError):
    """The configuration or a file it names is invalid."""


class StoreError(KbsError):
    """The database failed or holds something it should not."""


class DatabaseUnavailable(StoreError):
    """The database server cannot be reached (or SQLite stayed locked); retry later."""


class StoreConflict(StoreError):
    """A unique constraint refused a write: another writer got there first."""


class OperatorError(KbsError):
    """An operator command was given arguments that cannot be carried out."""


class NotFound(OperatorError):
    """A named node, key, grant or policy does not exist."""


class InvalidRequest(KbsError):
    """Malformed input on the wire: bad sizes, truncated or garbage TPM structures."""


class EventLogInvalid(InvalidRequest):
    """The boot event log is not a TCG PC Client event log (truncated, garbage, over limits)."""


class EkCertificateMalformed(InvalidRequest):
    """The EK certificate does not parse as one certificate profile we can judge: duplicate
    extensions, unsupported name forms, an unreadable issuer or subject name."""


class UnknownNode(KbsError):
    """The node name is not enrolled."""

    @classmethod
    def not_enrolled(cls, name: str) -> UnknownNode:
        """The refusal a node gets for a nonce or an attestation before it has enrolled."""
        return cls(f"node {name!r} is not enrolled; the agent enrolls it on its next run")


# --- enrollment -----------------------------------------------------------------------------


class EnrollmentRefused(KbsError):
    """Enrollment was refused; nothing was recorded for the node."""


class UntrustedEk(EnrollmentRefused):
    """The EK certificate does not chain to the configured EK root bundle."""


class EkPublicMismatch(EnrollmentRefused):
    """The EK public area does not match the EK certificate's public key."""


class AkAttributesInvalid(EnrollmentRefused):
    """The AK is not a restricted, fixedTPM signing key created inside the TPM."""


class ActivationFailed(EnrollmentRefused):
    """The credential-activation proof is wrong, expired or unknown."""


class NodeEkConflict(EnrollmentRefused):
    """A known node name arrived with a different EK; re-enrollment is never silent."""


class NotAllowlisted(EnrollmentRefused):
    """Enrollment mode is allowlist and this EK hash is not registered."""


# --- attestation ----------------------------------------------------------------------------


class AttestationFailed(KbsError):
    """Attestation did not pass; nothing was released."""


class NonceUnknown(AttestationFailed):
    """The nonce was never issued to this node or has already been used."""


class NonceExpired(AttestationFailed):
    """The nonce's lifetime has passed."""


class QuoteInvalid(AttestationFailed):
    """The quote does not verify."""


class QuoteStructureInvalid(QuoteInvalid):
    """The attestation structure is not a TPM-generated quote (magic/type/signer)."""


class IncorrectSignature(QuoteInvalid):
    """The quote signature does not verify with the enrolled AK."""


class QualifyingDataMismatch(QuoteInvalid):
    """The quote was made over another nonce."""


class PcrSelectionMismatch(QuoteInvalid):
    """The PCRs sent or required by policy are not the ones the quote signed."""


class PcrDigestMismatch(QuoteInvalid):
    """The PCR values sent do not hash to the digest the TPM signed."""


class EventLogMismatch(AttestationFailed):
    """The boot event log does not replay to the quoted PCR values."""


class EventLogMissing(AttestationFailed):
    """A policy names boot components but the node sent no boot event log."""


class CounterRollback(AttestationFailed):
    """The quote's resetCount/restartCount are lower than the node's last verified quote had:
    the TPM's state was rolled back (restored from a copy or snapshot)."""


class NodeNotApproved(AttestationFailed):
    """The node is not approved (pending)."""


class NodeRevoked(AttestationFailed):
    """The operator revoked the node."""


class NoPolicy(AttestationFailed):
    """No attestation policy is assigned to the node: empty policy means deny."""


class PolicyDenied(AttestationFailed):
    """The node's boot components or PCR values are not allowed by its attestation policy."""

    def __init__(self, message: str, pcrs: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.pcrs = tuple(pcrs)


class NotGranted(AttestationFailed):
    """No key is granted to the node."""


# --- watch streams --------------------------------------------------------------------------


class FeedClosed(KbsError):
    """The broker is stopping (or its change feed failed): no new watch streams."""


class TooManyWatchers(KbsError):
    """The broker's limit on open watch streams is reached."""


# --- the admin API --------------------------------------------------------------------------


class AdminAccessDenied(KbsError):
    """A client certificate that may not use the admin API (or no certificate at all)."""


class RevocationsUnreadable(AdminAccessDenied):
    """The database holding the revocations cannot be read: the certificate is refused (the
    check fails closed), with UNAVAILABLE since a later request may pass."""


class RevocationNotShared(StoreError):
    """``admin-cert revoke`` revoked in ``admin_certs`` but could not write the database."""


class AdminUnavailable(KbsError):
    """The admin API could not be reached or failed (the operator's side)."""

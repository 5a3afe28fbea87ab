"""Every broker error, by its exact class, to the gRPC status code the broker answers with, on
the node service and on the admin API alike: errors know no transport (``kbs.errors``), and this
is the one table that gives them one (``status_code``; tests/kbs/test_errors.py keeps it
exhaustive).

What clients do with the codes: an agent removes keys only on a denial that carries
``keylease-verdict: denied`` (``kbs.nodeapi.status.VERIFIED_DENIALS``); the operator's client
(``kbs.admin.client``) reads PERMISSION_DENIED as a refused certificate, NOT_FOUND /
INVALID_ARGUMENT as an argument to fix (exit 2), anything else as the broker failing (exit 1).
"""

from __future__ import annotations

import grpc

from kbs import errors as e

__all__ = ["STATUS", "status_code"]

_S = grpc.StatusCode
STATUS: dict[type[e.KbsError], grpc.StatusCode] = {
    e.KbsError: _S.INTERNAL,
    e.ConfigError: _S.INTERNAL,
    e.StoreError: _S.INTERNAL,
    e.DatabaseUnavailable: _S.UNAVAILABLE,
    e.StoreConflict: _S.INTERNAL,
    e.OperatorError: _S.INVALID_ARGUMENT,
    e.NotFound: _S.NOT_FOUND,
    e.InvalidRequest: _S.INVALID_ARGUMENT,
    e.EventLogInvalid: _S.INVALID_ARGUMENT,
    e.EkCertificateMalformed: _S.INVALID_ARGUMENT,
    e.UnknownNode: _S.NOT_FOUND,
    e.EnrollmentRefused: _S.PERMISSION_DENIED,
    e.UntrustedEk: _S.PERMISSION_DENIED,
    e.EkPublicMismatch: _S.PERMISSION_DENIED,
    e.AkAttributesInvalid: _S.PERMISSION_DENIED,
    e.ActivationFailed: _S.PERMISSION_DENIED,
    e.NodeEkConflict: _S.ALREADY_EXISTS,
    e.NotAllowlisted: _S.PERMISSION_DENIED,
    e.AttestationFailed: _S.PERMISSION_DENIED,
    e.NonceUnknown: _S.PERMISSION_DENIED,
    e.NonceExpired: _S.PERMISSION_DENIED,
    e.QuoteInvalid: _S.PERMISSION_DENIED,
    e.QuoteStructureInvalid: _S.PERMISSION_DENIED,
    e.IncorrectSignature: _S.PERMISSION_DENIED,
    e.QualifyingDataMismatch: _S.PERMISSION_DENIED,
    e.PcrSelectionMismatch: _S.PERMISSION_DENIED,
    e.PcrDigestMismatch: _S.PERMISSION_DENIED,
    e.EventLogMismatch: _S.PERMISSION_DENIED,
    e.EventLogMissing: _S.PERMISSION_DENIED,
    e.CounterRollback: _S.PERMISSION_DENIED,
    e.NodeNotApproved: _S.PERMISSION_DENIED,
    e.NodeRevoked: _S.PERMISSION_DENIED,
    e.NoPolicy: _S.PERMISSION_DENIED,
    e.PolicyDenied: _S.PERMISSION_DENIED,
    e.NotGranted: _S.PERMISSION_DENIED,
    e.FeedClosed: _S.UNAVAILABLE,
    e.TooManyWatchers: _S.RESOURCE_EXHAUSTED,
    e.AdminAccessDenied: _S.PERMISSION_DENIED,
    e.RevocationsUnreadable: _S.UNAVAILABLE,
    e.RevocationNotShared: _S.INTERNAL,
    e.AdminUnavailable: _S.INTERNAL,
}


def status_code(exc: e.KbsError) -> grpc.StatusCode:
    """``exc``'s status by its exact class (INTERNAL for a class the table lacks; a test keeps
    the table exhaustive)."""
    return STATUS.get(type(exc), grpc.StatusCode.INTERNAL)

"""The node API's status table: every broker error, by exact class, to the gRPC status code the
node-facing service answers with, and the errors that are a verdict on the node.

``VERIFIED_DENIALS`` are the refusals of a node that proved its identity and whose verified
evidence was judged: revoked, not approved, no policy, a policy or its event log refuses it,
nothing granted, its TPM's counters went back. They alone carry the trailing metadata
``keylease-verdict: denied``, the only answer on which an agent removes its keys
(tests/kbs/test_errors.py checks every error class has an entry).
"""

from __future__ import annotations

import grpc

from kbs import errors as e

__all__ = ["NODE_STATUS", "VERIFIED_DENIALS"]

_S = grpc.StatusCode
# Every broker error, by exact class, to the status the node API answers with.
NODE_STATUS: dict[type[e.KbsError], grpc.StatusCode] = {
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
# A verdict on the (authenticated) node: answered with VERDICT_KEY: VERDICT_DENIED, the only answer
# on which an agent removes its keys.
VERIFIED_DENIALS: frozenset[type[e.KbsError]] = frozenset(
    {
        e.NodeRevoked,
        e.NodeNotApproved,
        e.NoPolicy,
        e.PolicyDenied,
        e.NotGranted,
        e.EventLogMismatch,
        e.EventLogMissing,
        e.CounterRollback,
    }
)

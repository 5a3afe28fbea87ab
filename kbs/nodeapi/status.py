"""The errors that are a verdict on the node (the status code of every error, for both services,
is ``kbs.status``).

``VERIFIED_DENIALS`` are the refusals of a node that proved its identity and whose verified
evidence was judged: revoked, not approved, no policy, a policy or its event log refuses it,
nothing granted, its TPM's counters went back. They alone carry the trailing metadata
``keylease-verdict: denied``, the only answer on which an agent removes its keys.
"""

from __future__ import annotations

from kbs import errors as e

__all__ = ["VERIFIED_DENIALS"]

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

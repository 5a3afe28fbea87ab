"""The agent's one error root. Each error maps to one exit code and one line for the operator."""

from __future__ import annotations

__all__ = [
    "AgentError",
    "AttestationDenied",
    "AttestationRefused",
    "BrokerBusy",
    "BrokerError",
    "BrokerUnreachable",
    "ConfigError",
    "EnrollmentRefused",
    "InvalidKey",
    "KeystoreError",
    "NoApprovedState",
    "NodeUnknown",
    "NotAuthenticated",
    "PendingApproval",
    "ReleaseInvalid",
    "StateError",
    "TpmError",
    "TpmUnavailable",
]


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    exit_code = 1

    def diagnostics(self) -> str:
        """Text for the operator: what went wrong and what to do."""
        return str(self)


class ConfigError(AgentError):
    exit_code = 2


class PendingApproval(AgentError):
    """Enrolled and attested, awaiting operator approval."""

    exit_code = 3


class AttestationDenied(AgentError):
    """A verified denial: the broker authenticated this node and refused it (policy, revocation,
    no grant, an event log that does not replay, TPM counters rolled back). The only broker
    answer that removes the keys."""

    exit_code = 4


class EnrollmentRefused(AgentError):
    """The broker refused enrollment (EK not trusted, EK conflict, not allowlisted)."""

    exit_code = 5


class BrokerUnreachable(AgentError):
    """No answer from the broker (network, TLS, timeout)."""

    exit_code = 6


class BrokerBusy(BrokerUnreachable):
    """The broker refused for now (rate limit, overload: RESOURCE_EXHAUSTED); retry later."""

    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class BrokerError(AgentError):
    """The broker answered with an error that is not a denial."""

    exit_code = 6


class NodeUnknown(BrokerError):
    """The broker does not know this node (never enrolled there, or its record was removed)."""


class NotAuthenticated(BrokerError):
    """The broker did not accept this node's call authentication (UNAUTHENTICATED): it does not
    know this node's key (never enrolled there, its database was replaced, or enrolled again
    since). The agent enrolls again; its keys stay."""


class AttestationRefused(BrokerError):
    """The broker refused this attempt without a verdict on the node (a nonce unknown or expired,
    a quote it could not verify): the keys stay, and the agent tries again."""


class TpmUnavailable(AgentError):
    """The TPM cannot be opened through the configured TCTI."""

    exit_code = 7


class TpmError(AgentError):
    """A TPM command failed."""

    exit_code = 7


class ReleaseInvalid(AgentError):
    """A release (or the sealed cache) does not open in this TPM or is malformed."""

    exit_code = 8


class NoApprovedState(ReleaseInvalid):
    """No approval the agent holds opens the sealed release in this boot state (none matches its
    PCR values, or those that do expired in TPM time, or are not the broker's): the message names
    the component that differs from every approved state where it can."""


class InvalidKey(AgentError):
    """A key is not one ocicrypt would accept."""

    exit_code = 8


class KeystoreError(AgentError):
    """A key directory cannot be used safely (symlink, wrong type, I/O error)."""

    exit_code = 9


class StateError(AgentError):
    """The agent's state directory is unusable."""

    exit_code = 9

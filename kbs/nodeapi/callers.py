"""Who is calling, and at what cost to whom: the node-level half of admission control.

``CallerCheck.admit`` reads a call's single request (keeping the bytes it arrived as: they are what
the node's MAC covers), then for GetNonce, Attest and Watch authenticates the node the request
names (``kbs.nodeapi.nodeauth``: a missing or wrong MAC and an unknown node are the same
UNAUTHENTICATED answer) and only then charges that node's rate budget; for StartEnrollment it
charges the budget of the EK the request carries (its hash, not its encoding). Until here a call
has spent only its peer's budget (``kbs.nodeapi.admission``).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, cast

import grpc

from kbs.config import LimitSettings
from kbs.errors import DatabaseUnavailable, InvalidRequest, KbsError
from kbs.nodeapi.metrics import BrokerMetrics
from kbs.nodeapi.nodeauth import REFUSED_TEXT, Metadata, NodeAuthenticator
from kbs.nodeapi.ratelimit import TokenBuckets
from kbs.tpm.ekcert import ek_hash
from kbs.tpm.objects import parse_public
from keylease.api.v1.limits import MAX_NODE_NAME, MAX_TPM_PUBLIC
from keylease.api.v1.nodeauth import AUTHENTICATED_METHODS

__all__ = ["CallerCheck", "Context", "Received", "Refused", "read_one"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # not in grpc-stubs


class Received(NamedTuple):
    """A request message and the bytes it arrived as."""

    raw: bytes
    message: Any


class Refused(Exception):
    """Admission refused the call: ``limit`` names the limit for metrics ("" when it is not a
    limit), ``retry_after`` the hint in seconds, ``code`` the status to answer."""

    def __init__(
        self,
        limit: str,
        text: str,
        retry_after: float,
        code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) -> None:
        super().__init__(text)
        self.limit = limit
        self.retry_after = retry_after
        self.code = code


class CallerCheck:
    """Authentication and the per-node / per-EK budgets (one per broker process)."""

    def __init__(
        self, settings: LimitSettings, metrics: BrokerMetrics, authenticator: NodeAuthenticator
    ) -> None:
        self._s = settings
        self._metrics = metrics
        self._auth = authenticator
        self._node_rate = _buckets(
            settings.rate_limit_node_per_second, settings.rate_limit_node_burst
        )
        self._ek_rate = _buckets(settings.rate_limit_ek_per_second, settings.rate_limit_ek_burst)

    async def admit(self, path: str, peer: str, context: Context) -> Any:
        """Read the request, then authenticate the node and charge its (or its EK's) budget;
        returns the request message."""
        received: Received = await read_one(context)
        request = received.message
        name = getattr(request, "node_name", "")
        if path in AUTHENTICATED_METHODS:
            await self._authenticate(path, peer, context, name, received.raw)
            self._admit_node(name)
        elif path.endswith("/StartEnrollment"):
            self._admit_ek(getattr(request, "ek_public", b""))
        return request

    async def _authenticate(
        self, path: str, peer: str, context: Context, name: object, raw: bytes
    ) -> None:
        try:
            ok = isinstance(name, str) and await self._auth.verify(
                path, cast(Metadata, context.invocation_metadata()), name, raw
            )
        except DatabaseUnavailable as exc:
            self._metrics.db_errors.inc()
            raise Refused("", exc.diagnostics(), 0, grpc.StatusCode.UNAVAILABLE) from None
        except KbsError as exc:
            self._metrics.db_errors.inc()
            log.error("%s: cannot check the node's key: %s", path, exc)
            raise Refused("", "internal error; see the broker log", 0,
                           grpc.StatusCode.INTERNAL) from None  # fmt: skip
        if not ok:
            self._auth.refused(peer, path)
            raise Refused("unauthenticated", REFUSED_TEXT, 0, grpc.StatusCode.UNAUTHENTICATED)

    def _admit_node(self, name: str) -> None:
        """The per-node rate, charged only once the call proved it comes from node ``name``."""
        if self._node_rate is None or not name or len(name) > MAX_NODE_NAME:
            return
        wait = self._node_rate.take(name)
        if wait:
            rate = self._s.rate_limit_node_per_second
            raise Refused("node_rate", f"too many requests for node {name!r} ({rate:g}/s)", wait)

    def _admit_ek(self, ek_public: object) -> None:
        """The per-EK rate of StartEnrollment, keyed by the EK's hash (the key, not its
        encoding). A request whose EK does not parse passes: the handler refuses it."""
        if self._ek_rate is None or not isinstance(ek_public, bytes):
            return
        if not ek_public or len(ek_public) > MAX_TPM_PUBLIC:
            return
        try:
            digest = ek_hash(parse_public(ek_public, "ek_public").key)
        except InvalidRequest:
            return
        wait = self._ek_rate.take(digest)
        if wait:
            rate = self._s.rate_limit_ek_per_second
            raise Refused(
                "ek_rate", f"too many enrollments for EK {digest[:16]} ({rate:g}/s)", wait
            )


def _buckets(rate: float, burst: int) -> TokenBuckets | None:
    return TokenBuckets(rate, burst) if rate > 0 else None


async def read_one(context: Context) -> Any:
    """The single request message of a unary call."""
    request = await context.read()
    if request is _EOF:
        raise Refused(
            "empty", "the call carried no request message", 0, grpc.StatusCode.INVALID_ARGUMENT
        )
    return request

"""Every broker error has a status code in the broker's one table, by its exact class (httpx's
``test_httpcore_all_exceptions_mapped``): a new error class without an entry fails here, not in
production as an INTERNAL."""

from __future__ import annotations

import grpc

from kbs import errors
from kbs.errors import KbsError
from kbs.status import STATUS


def every_error_class() -> set[type[KbsError]]:
    found: set[type[KbsError]] = set()
    todo = [KbsError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_class_lives_in_kbs_errors() -> None:
    outside = sorted(
        f"{c.__module__}.{c.__qualname__}"
        for c in every_error_class()
        if c.__module__ != errors.__name__
    )
    assert not outside, f"broker errors belong in kbs/errors.py: {outside}"
    assert {c.__name__ for c in every_error_class()} <= set(errors.__all__)


def test_every_error_class_is_mapped() -> None:
    """The node service and the admin API answer with the same table (``kbs.status``)."""
    table = STATUS
    missing = sorted(c.__name__ for c in every_error_class() if c not in table)
    assert not missing, f"no status code for {missing}"
    assert set(table) == every_error_class(), "an entry for a class that is not a KbsError"
    assert all(isinstance(code, grpc.StatusCode) for code in table.values())


def test_refusals_keep_their_codes() -> None:
    """What agents and the operator's client act on: a refusal is never INTERNAL, a database
    outage is UNAVAILABLE (retry), a conflict of EKs is ALREADY_EXISTS."""
    table = STATUS
    for cls in every_error_class():
        if issubclass(cls, errors.EnrollmentRefused | errors.AttestationFailed):
            expected = (
                grpc.StatusCode.ALREADY_EXISTS
                if cls is errors.NodeEkConflict
                else grpc.StatusCode.PERMISSION_DENIED
            )
            assert table[cls] is expected, cls
    assert table[errors.DatabaseUnavailable] is grpc.StatusCode.UNAVAILABLE
    assert table[errors.RevocationsUnreadable] is grpc.StatusCode.UNAVAILABLE
    assert table[errors.AdminAccessDenied] is grpc.StatusCode.PERMISSION_DENIED
    assert table[errors.InvalidRequest] is grpc.StatusCode.INVALID_ARGUMENT
    assert table[errors.NotFound] is grpc.StatusCode.NOT_FOUND
    assert table[errors.UnknownNode] is grpc.StatusCode.NOT_FOUND
    assert table[errors.TooManyWatchers] is grpc.StatusCode.RESOURCE_EXHAUSTED

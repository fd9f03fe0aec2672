"""One root error with coded subclasses.

Every refusal Stratus gives a caller is one of these: a machine ``kind`` that
clients switch on, and a ``message`` a person can act on. Broker failures are
translated into them at the boundary (the event store) so no nats-py
exception leaks upwards.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class StratusError(Exception):
    """Root of every error Stratus raises on purpose."""

    kind: ClassVar[str] = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> ErrorBody:
        return ErrorBody(kind=self.kind, message=self.message)


class Invalid(StratusError):
    """The request is malformed: a field is missing, mistyped or out of range."""

    kind = "invalid"


class NotFound(StratusError):
    kind = "not_found"


class AlreadyExists(StratusError):
    kind = "already_exists"


class Conflict(StratusError):
    """The state moved under the caller and retrying did not settle it."""

    kind = "conflict"


class Unavailable(StratusError):
    """The broker or a service could not be reached; the caller may retry."""

    kind = "unavailable"


class Unauthenticated(StratusError):
    kind = "unauthenticated"


class Forbidden(StratusError):
    kind = "forbidden"


class QuotaExceeded(StratusError):
    kind = "quota_exceeded"


class Internal(StratusError):
    """A bug: something we did not plan for. Logged with its traceback."""

    kind = "internal"


class HostError(StratusError):
    """A host could not do what it was asked (libvirt, qemu-img, the kernel
    refused or failed); ``message`` is the host's own words.

    Agents report it on the log (``server.build-failed``, ``server.failed``)
    rather than answering a caller with it."""

    kind = "host_error"


class ConcurrencyConflict(StratusError):
    """A conditional append was refused: the expected position had moved.

    ``actual`` is the last sequence the server holds for the condition's
    subject filter, so the caller can read just the events after its own
    position before deciding again.
    """

    kind = "conflict"

    def __init__(self, message: str, expected: int, actual: int | None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class ErrorBody(msgspec.Struct, frozen=True):
    kind: str
    message: str


ERROR_KINDS: dict[str, type[StratusError]] = {
    cls.kind: cls
    for cls in (
        Invalid,
        NotFound,
        AlreadyExists,
        Conflict,
        Unavailable,
        Unauthenticated,
        Forbidden,
        QuotaExceeded,
        Internal,
    )
}


def from_wire(body: ErrorBody) -> StratusError:
    """Rebuild the typed error a service replied with."""
    return ERROR_KINDS.get(body.kind, StratusError)(body.message)

"""kiln's own error model: a status code independent of any transport.

Every failure the data plane can report is a KilnError carrying one of these
codes; each front end (gRPC today) maps the code once, in one place.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """Outcome of a request; the value is the lower-case name used in metrics."""

    OK = "success"
    CANCELLED = "cancelled"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    UNIMPLEMENTED = "unimplemented"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"

    @property
    def outcome(self) -> str:
        return self.value


class KilnError(Exception):
    """A failure with a status code and a message meant for the client."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"KilnError({self.status.name}, {self.message!r})"


def invalid_argument(message: str) -> KilnError:
    return KilnError(Status.INVALID_ARGUMENT, message)


def not_found(message: str) -> KilnError:
    return KilnError(Status.NOT_FOUND, message)


def unavailable(message: str) -> KilnError:
    return KilnError(Status.UNAVAILABLE, message)


def internal(message: str) -> KilnError:
    return KilnError(Status.INTERNAL, message)

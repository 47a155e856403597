"""Error types that cross service boundaries. Each carries a message meant for the user
and an `ErrorKind` that callers match on (never the message text).

An RPC handler that raises a `MemServeError` answers with the error's kind; any other
exception answers `INTERNAL`; a request that does not decode answers `BAD_REQUEST`. The
caller's `RpcError.kind` is that kind.
"""

from __future__ import annotations

import enum


class ErrorKind(str, enum.Enum):
    """Why a call was refused: the one field of an error reply code may branch on."""

    BAD_REQUEST = "bad_request"  # malformed or invalid arguments; retrying will not help
    OUT_OF_MEMORY = "out_of_memory"  # not enough free (or evictable) KV blocks right now
    UNKNOWN_ID = "unknown_id"  # a handle, transfer, block, tensor or instance id not known
    REFUSED = "refused"  # valid but not allowed now (busy blocks, wrong state, not allowed)
    UNAUTHORIZED = "unauthorized"  # a missing or wrong token
    UNAVAILABLE = "unavailable"  # a peer needed for the call is down or unreachable
    TIMEOUT = "timeout"  # a peer needed for the call did not answer in time
    INTERNAL = "internal"  # a bug: the handler raised something unexpected


class MemServeError(Exception):
    """Base class of the project's errors; subclasses set `kind`."""

    kind: ErrorKind = ErrorKind.REFUSED

    def __init__(self, message: str = "", *, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class InvalidRequestError(MemServeError, ValueError):
    """A request the system will not run: bad sampling values, a prompt too long, ..."""

    kind = ErrorKind.BAD_REQUEST


def error_kind(exc: BaseException) -> ErrorKind:
    """The kind an error reply carries for `exc`."""
    if isinstance(exc, MemServeError):
        return exc.kind
    if isinstance(exc, TimeoutError):
        return ErrorKind.TIMEOUT
    if isinstance(exc, ConnectionError):
        return ErrorKind.UNAVAILABLE
    return ErrorKind.INTERNAL

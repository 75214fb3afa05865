"""Typed errors raised anywhere in loraplex, and the one place they become gRPC status codes."""
from __future__ import annotations

import grpc


class LoraplexError(Exception):
    """Base class: the message is meant for the user and goes into the status details."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(LoraplexError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LoraplexError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LoraplexError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LoraplexError):
    """The adapter cannot be served faithfully on this base model (or its files are broken)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LoraplexError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AdapterMemoryFull(ResourceExhausted):
    """The adapter does not fit the host-memory budget beside what requests in flight hold: a Generate waits for
    room (they finish), a LoadAdapter is told to retry."""


class OutOfRange(LoraplexError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(LoraplexError):
    code = grpc.StatusCode.UNAVAILABLE


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and details for an exception. Anything untyped is a bug: INTERNAL, no traceback leaked."""
    if isinstance(exc, LoraplexError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"


class InternalError(LoraplexError):
    """A bug or a failed step; the details stay generic and the traceback goes to the log."""

    code = grpc.StatusCode.INTERNAL

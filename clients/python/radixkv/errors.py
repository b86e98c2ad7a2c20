"""Errors raised by :class:`radixkv.Client`.

Every failed call raises a :class:`RadixKvError` subclass chosen by the gRPC
status code (``InvalidArgument`` for a bad request, ``Unauthenticated`` for
a missing or unknown token, ...); ``err.code`` is the ``grpc.StatusCode``
and ``err.details`` the server's message.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

import grpc

__all__ = [
    "RadixKvError",
    "CancelledError",
    "InvalidArgumentError",
    "DeadlineExceededError",
    "NotFoundError",
    "AlreadyExistsError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "FailedPreconditionError",
    "AbortedError",
    "OutOfRangeError",
    "UnimplementedError",
    "InternalError",
    "UnavailableError",
    "DataLossError",
    "UnauthenticatedError",
    "error_from_rpc",
]


class RadixKvError(Exception):
    """A failed radixkv call."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: Optional[grpc.StatusCode] = None, method: str = "") -> None:
        if code is not None:
            self.code = code
        self.details = details
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{self.code.name}: {details}")


class CancelledError(RadixKvError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgumentError(RadixKvError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(RadixKvError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(RadixKvError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(RadixKvError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(RadixKvError, PermissionError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(RadixKvError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(RadixKvError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(RadixKvError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(RadixKvError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(RadixKvError, NotImplementedError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(RadixKvError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(RadixKvError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(RadixKvError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(RadixKvError, PermissionError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: Dict[grpc.StatusCode, Type[RadixKvError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_from_rpc(err: grpc.RpcError, method: str = "") -> RadixKvError:
    """The :class:`RadixKvError` for a failed gRPC call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    cls = _BY_CODE.get(code, RadixKvError)
    return cls(details, code, method)

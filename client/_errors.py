"""Typed exceptions built from a gRPC status and its rich details (google.rpc.Status)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "FieldViolation",
    "HeadraceError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]

# Trailing metadata key of a serialized google.rpc.Status (what grpcio-status writes).
STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, from a google.rpc.BadRequest detail."""

    field: str
    description: str


class HeadraceError(Exception):
    """A call failed. Subclasses name the common gRPC status codes.

    Attributes:
        code: the gRPC status code.
        details: the status message the server sent.
        field_violations: the fields a google.rpc.BadRequest detail named, in order.
        field: the first violated field, or None.
        request_id: the request's id (from a google.rpc.RequestInfo detail, the
            `x-request-id` trailer, or the id the caller sent), or None.
        reason: the google.rpc.ErrorInfo reason, or None.
        retry_after: seconds the server asked to wait (google.rpc.RetryInfo), or None.
    """

    code: grpc.StatusCode

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        field_violations: tuple[FieldViolation, ...] = (),
        request_id: str | None = None,
        reason: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details
        self.field_violations = field_violations
        self.request_id = request_id
        self.reason = reason
        self.retry_after = retry_after

    @property
    def field(self) -> str | None:
        return self.field_violations[0].field if self.field_violations else None

    def __repr__(self) -> str:
        extra = f", field={self.field!r}" if self.field else ""
        return f"{type(self).__name__}(code={self.code.name}, details={self.details!r}{extra})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only state survives pickling (e.g. across process pools).
        return (_rebuild, (type(self), self.code, self.details, self.__dict__.copy()))


def _rebuild(
    cls: type[HeadraceError], code: grpc.StatusCode, details: str, state: dict[str, Any]
) -> HeadraceError:
    err = cls(code, details)
    err.__dict__.update(state)
    return err


class InvalidArgument(HeadraceError):
    """INVALID_ARGUMENT: a request field is wrong; `field` names it."""


class NotFound(HeadraceError):
    """NOT_FOUND: unknown model or model version."""


class ResourceExhausted(HeadraceError):
    """RESOURCE_EXHAUSTED: the model's queue is full; retry later."""


class Unavailable(HeadraceError):
    """UNAVAILABLE: the server is unreachable, draining, or the model is not loaded yet."""


class DeadlineExceeded(HeadraceError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class Cancelled(HeadraceError):
    """CANCELLED: the call was cancelled."""


class Internal(HeadraceError):
    """INTERNAL: the server failed on this call."""


class Unauthenticated(HeadraceError):
    """UNAUTHENTICATED: missing or invalid credentials."""


class PermissionDenied(HeadraceError):
    """PERMISSION_DENIED: the credentials do not allow this call."""


class Unimplemented(HeadraceError):
    """UNIMPLEMENTED: the server does not serve this method."""


_BY_CODE: dict[grpc.StatusCode, type[HeadraceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


def error_from_status(
    code: grpc.StatusCode,
    details: str,
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None,
    request_id: str | None = None,
) -> HeadraceError:
    """Build the typed exception for a failed call from its status and trailing metadata.

    `request_id` is the id the caller sent, used when the server reports none.
    """
    violations: list[FieldViolation] = []
    reason: str | None = None
    retry_after: float | None = None
    for key, value in trailing_metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and value:
            request_id = value
        elif key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                continue
            if status.message and not details:
                details = status.message
            for any_detail in status.details:
                if any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    any_detail.Unpack(bad)
                    violations.extend(
                        FieldViolation(v.field, v.description) for v in bad.field_violations
                    )
                elif any_detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
                    info = error_details_pb2.RequestInfo()
                    any_detail.Unpack(info)
                    request_id = info.request_id or request_id
                elif any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    error_info = error_details_pb2.ErrorInfo()
                    any_detail.Unpack(error_info)
                    reason = error_info.reason or None
                elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    any_detail.Unpack(retry)
                    retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    cls = _BY_CODE.get(code, HeadraceError)
    return cls(
        code,
        details,
        field_violations=tuple(violations),
        request_id=request_id,
        reason=reason,
        retry_after=retry_after,
    )


def error_from_rpc_error(err: grpc.RpcError, request_id: str | None = None) -> HeadraceError:
    """The typed exception for a sync `grpc.RpcError` (a grpc.Call as well)."""
    if not isinstance(err, grpc.Call):
        return HeadraceError(grpc.StatusCode.UNKNOWN, str(err), request_id=request_id)
    return error_from_status(
        err.code(), err.details() or "", _pairs(err.trailing_metadata()), request_id
    )


def error_from_aio_rpc_error(
    err: grpc.aio.AioRpcError, request_id: str | None = None
) -> HeadraceError:
    """The typed exception for a `grpc.aio.AioRpcError`."""
    return error_from_status(
        err.code(), err.details() or "", _pairs(err.trailing_metadata()), request_id
    )


def _pairs(metadata: Any) -> list[tuple[str, str | bytes]]:
    # Sync calls give a tuple of (key, value) pairs; grpc.aio gives a Metadata object.
    if metadata is None:
        return []
    return [(str(key), value) for key, value in metadata]


class TypedErrors:
    """`with TypedErrors(request_id):` raises a failed call's gRPC error as its typed
    `HeadraceError` (the gRPC error as `__cause__`), for sync and grpc.aio calls alike."""

    __slots__ = ("request_id",)

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id  # the id the caller sent, used when the server names none

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            raise error_from_aio_rpc_error(exc, self.request_id) from exc
        if isinstance(exc, grpc.RpcError):
            raise error_from_rpc_error(exc, self.request_id) from exc

"""Service-level errors and their status codes (gRPC, and HTTP for the HTTP front), in one place.

Engine errors (server/types.py) and the service's own errors below are
mapped to a status by `status_for`; `rich_status` turns one into the
`google.rpc.Status` that travels in the `grpc-status-details-bin` trailer,
with a `google.rpc.BadRequest` naming the field for INVALID_ARGUMENT.

    InvalidArgument                  INVALID_ARGUMENT (+ BadRequest field)
    ModelNotFound                    NOT_FOUND
    ModelUnavailable                 UNAVAILABLE (the model's versions are loading or failed)
    ModelForbidden                   PERMISSION_DENIED (an API key scoped to other models)
    QueueFull                        RESOURCE_EXHAUSTED (+ RetryInfo: when to retry)
    ShuttingDown / ServerDraining    UNAVAILABLE
    BackendFailure / anything else   INTERNAL (generic message)

`HTTP_STATUS` gives the HTTP status of each code (Google's published mapping of
google.rpc.Code to HTTP), so every front answers the same error alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from headrace.server.types import BackendFailure, InvalidArgument, QueueFull, ShuttingDown

INTERNAL_MESSAGE = "internal error while running the model; the server logged the cause"


class ServiceError(Exception):
    """An error raised by the service layer with a message safe to show a caller."""


class ModelNotFound(ServiceError):
    """Unknown model, unknown version, or a model of the other task: NOT_FOUND."""


class ModelUnavailable(ServiceError):
    """A known model (or version) that is not ready: loading, failed to load, or
    retiring (server/model_state.py). UNAVAILABLE, naming the state."""


class ModelForbidden(ServiceError):
    """An API key scoped to some models asked for another (server/auth.py): PERMISSION_DENIED."""


class ServerDraining(ServiceError):
    """The server is shutting down and takes no new calls: UNAVAILABLE."""


HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}


@dataclass(frozen=True)
class MappedError:
    code: grpc.StatusCode
    message: str
    field: str | None = None  # set for INVALID_ARGUMENT
    internal: bool = False  # True when the cause must be logged, not shown
    retry_after_s: float | None = None  # set for RESOURCE_EXHAUSTED: the caller's retry hint

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


# A message quotes what the caller sent (a model name, a version): bounded, so that a
# 100 kB name cannot make trailers past a client's metadata limit (16 KiB in grpc core,
# where the call ends RESOURCE_EXHAUSTED "Stream removed" instead of its own status).
MAX_MESSAGE_CHARS = 1000


def bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 3] + "..."


def status_for(exc: BaseException) -> MappedError:
    """The status a caller sees for `exc`. Never leaks paths or tracebacks."""
    mapped = _status_for(exc)
    if len(mapped.message) > MAX_MESSAGE_CHARS:
        mapped = replace(mapped, message=bounded(mapped.message))
    return mapped


def _status_for(exc: BaseException) -> MappedError:
    if isinstance(exc, InvalidArgument):
        return MappedError(grpc.StatusCode.INVALID_ARGUMENT, exc.message, field=exc.field)
    if isinstance(exc, ModelNotFound):
        return MappedError(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, ModelUnavailable):
        return MappedError(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, ModelForbidden):
        return MappedError(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    if isinstance(exc, QueueFull):
        return MappedError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            str(exc) or "the model's queue is full; retry later",
            retry_after_s=exc.retry_after_s,
        )
    if isinstance(exc, ShuttingDown | ServerDraining):
        return MappedError(
            grpc.StatusCode.UNAVAILABLE, str(exc) or "the server is shutting down; retry elsewhere"
        )
    if isinstance(exc, BackendFailure):
        # BackendFailure's own message is documented as safe, but keep one generic
        # text so nothing from a runtime's error string can reach a caller.
        return MappedError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, internal=True)
    return MappedError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, internal=True)


def rich_status(err: MappedError) -> status_pb2.Status:
    """The google.rpc.Status for `err`, with a BadRequest detail when a field is named."""
    status = status_pb2.Status(code=err.code.value[0], message=err.message)
    if err.field is not None:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=err.field, description=err.message
                )
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad)
        status.details.append(detail)
    if err.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(retry_after_ms(err))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
    return status


def retry_after_ms(err: MappedError) -> int:
    return max(1, round((err.retry_after_s or 0.0) * 1000))

"""What every front shares around its handlers: the drain gate, errors -> status, the log line.

Both servicers (headrace.v1.Inference in server/service.py and the Open
Inference Protocol in server/kserve/) wrap each call the same way:

    info = gate.begin("ModelInfer", request_id, context, front="kserve", id_field="id")
    try:
        gate.admit(info)                    # UNAVAILABLE while the server drains; a bad id
        ...                                 # the handler
    except BaseException as exc:
        await abort_for(info, context, exc) # cancellation re-raised; the rest -> a status
    finally:
        gate.finish(info)                   # one `rpc` log line + request metrics

The HTTP front (server/http_api/) has no ServicerContext: it counts its calls
in with `gate.enter(info)` (its own RpcInfo, `front="http"`, the route as
`rpc`), classifies errors with `mapped_error` and answers them in its own
shape, and puts what only HTTP has (the HTTP status, `stream`) in `info.extra`.

One Gate per server: draining refuses new calls on every front, and the
server's drain waits until no call of any front is running.

API keys (server/auth.py) are checked before any of that, by `AuthInterceptor`,
for every service on the port: a call without a valid key never reaches a
handler. The caller it finds is what `auth.authorize_model` reads once a front
knows the model.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeAlias

import grpc
from grpc_status import rpc_status
from headrace.server import auth, tracing
from headrace.server.errors import (
    MappedError,
    ServerDraining,
    retry_after_ms,
    rich_status,
    status_for,
)
from headrace.server.logs import get_logger, rpc_line
from headrace.server.metrics import REQUEST_DURATION, REQUESTS
from headrace.server.types import InvalidArgument

log = get_logger("headrace.service")

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

REQUEST_ID_KEY = "x-request-id"
RETRY_AFTER_KEY = "retry-after-ms"  # RESOURCE_EXHAUSTED: milliseconds to wait before a retry
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # the same, read by gRPC's own retry policy
Metadata: TypeAlias = tuple[tuple[str, str | bytes], ...]


@dataclass
class RpcInfo:
    """What the log line of one RPC says; handlers fill in model and token counts."""

    rpc: str
    request_id: str
    peer: str
    # "native" (headrace.v1), "kserve" (inference.GRPCInferenceService) or "http"
    front: str = "native"
    start: float = field(default_factory=time.perf_counter)
    model: str = ""
    model_version: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    extra: dict[str, Any] = field(default_factory=dict)  # a front's own keys for the log line
    trace: Any = None  # server/tracing.py's RpcTrace while tracing is on
    refusal: Exception | None = None  # what `Gate.admit` raises: a caller's id that cannot travel
    # a stream's initial metadata, on its way since the request was queued (overlapping the
    # prefill instead of delaying the first message); None: sent with the first message
    headers: asyncio.Future[None] | None = None


# Request ids the server makes: 32 hex digits, a random half per process and a counter
# (unique as uuid4 hex is, without drawing 16 random bytes per call).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4)))


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


MAX_REQUEST_ID = 128


def is_sendable_id(request_id: str) -> bool:
    """True for an id that may travel in `x-request-id` metadata: printable ASCII, bounded.

    gRPC refuses any other metadata value (the call then ends INTERNAL "Invalid metadata")."""
    return len(request_id) <= MAX_REQUEST_ID and all(" " <= c <= "~" for c in request_id)


def unsendable_id(field: str) -> InvalidArgument:
    return InvalidArgument(
        field, f"{field} must be at most {MAX_REQUEST_ID} printable ASCII characters"
    )


def metadata_request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and value:
            return value[:128]
    return ""


class Gate:
    """The drain flag and the count of running calls, shared by every front of one server."""

    def __init__(self) -> None:
        # Shutdown, in two steps (server/app.py): `stopping` first (health NOT_SERVING,
        # readiness false, calls still served while clients move away), then `draining`
        # (new calls refused with UNAVAILABLE before they run).
        self.stopping = False
        self.draining = False
        self.inflight = 0  # calls between begin and finish
        self.last_call = 0.0  # time.perf_counter() when the newest call came in
        self._idle = asyncio.Event()
        self._idle.set()
        # (rpc, model, code) -> the labelled counter and histogram: `labels()` per call
        # takes a lock and builds a key, a dict lookup does not
        self._series: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def wait_idle(self, within_s: float) -> bool:
        """Wait until no call is running (True) or `within_s` passed (False)."""
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def begin(
        self, name: str, own_id: str, context: Context, *, front: str, id_field: str = "request_id"
    ) -> RpcInfo:
        """Count a call in. `own_id` is the request's own id field (`id_field` names it); one
        that cannot travel in metadata is refused by `admit`, the call gets an id of ours."""
        refusal = None
        if own_id and not is_sendable_id(own_id):
            refusal = unsendable_id(id_field)
            own_id = ""
        request_id = own_id or metadata_request_id(context)
        info = RpcInfo(rpc=name, request_id=request_id, peer=context.peer() or "", front=front)
        info.refusal = refusal
        if tracing.TRACER is not None:  # the span; no own id: the trace id is the request id
            tracing.start_rpc(info, context.invocation_metadata())
        return self.enter(info)

    def enter(self, info: RpcInfo, headers: Any = None, method: str = "") -> RpcInfo:
        """Count `info`'s call in (`finish` counts it out): for a front without a gRPC context,
        which passes its `headers` (for the caller's trace context) and HTTP `method`."""
        if headers is not None and tracing.TRACER is not None:
            tracing.start_rpc(info, headers, method)
        if not info.request_id:
            info.request_id = new_request_id()
        self.inflight += 1
        self._idle.clear()
        self.last_call = info.start
        return info

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise ServerDraining("the server is shutting down; retry elsewhere")

    def admit(self, info: RpcInfo) -> None:
        """`refuse_if_draining`, then the refusal `begin` found in the request."""
        self.refuse_if_draining()
        if info.refusal is not None:
            raise info.refusal

    def finish(self, info: RpcInfo) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()
        seconds = time.perf_counter() - info.start
        code = info.code.name
        key = (info.rpc, info.model, code)
        series = self._series.get(key)
        if series is None:
            series = REQUESTS.labels(*key), REQUEST_DURATION.labels(info.rpc, info.model)
            self._series[key] = series
        series[0].inc()
        series[1].observe(seconds)
        caller = auth.current_caller()
        fields: dict[str, Any] = {"key_id": caller.key_id} if caller.key_id else {}
        fields.update(
            rpc=info.rpc,
            front=info.front,
            request_id=info.request_id,
            model=info.model,
            model_version=info.model_version,
            code=code,
            latency_ms=round(seconds * 1000, 3),
            prompt_tokens=info.prompt_tokens,
            completion_tokens=info.completion_tokens,
            peer=info.peer,
            **info.extra,
        )
        if info.trace is not None:
            tracing.end_rpc(info, fields)  # the span ends; the line gets trace_id and span_id
        rpc_line(log, fields)


def mapped_error(info: RpcInfo, exc: Exception) -> MappedError:
    """The status for `exc` (server/errors.py), the cause logged when it is internal."""
    mapped = status_for(exc)
    if mapped.internal:
        log.error(
            "rpc_failed",
            rpc=info.rpc,
            front=info.front,
            request_id=info.request_id,
            model=info.model,
            model_version=info.model_version,
            exc_info=exc,
        )
    return mapped


async def abort_for(
    info: RpcInfo, context: Context, exc: BaseException, mapped: MappedError | None = None
) -> NoReturn:
    """Record and re-raise cancellation; turn anything else into a status (raises).

    `mapped` overrides the status of server/errors.py (a front's own wording)."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        info.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        raise exc
    if isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):
        info.code = context.code() or grpc.StatusCode.UNKNOWN
        raise exc
    mapped = mapped or mapped_error(info, exc)
    info.code = mapped.code
    status = grpc_status(mapped)
    await context.abort(status.code, status.details, error_trailers(info, mapped, status))
    raise AssertionError("abort returned")  # it raises AbortError


def grpc_status(mapped: MappedError) -> grpc.Status:
    """The status (code, message, rich details) of `mapped`, built once per distinct answer:
    a burst of refusals from a full queue carries the same few (14-60 µs each, measured)."""
    ms = None if mapped.retry_after_s is None else retry_after_ms(mapped)
    return _grpc_status(mapped.code, mapped.message, mapped.field, ms)


@functools.lru_cache(maxsize=512)
def _grpc_status(
    code: grpc.StatusCode, message: str, field: str | None, retry_ms: int | None
) -> grpc.Status:
    retry_s = None if retry_ms is None else retry_ms / 1000
    return rpc_status.to_status(rich_status(MappedError(code, message, field, False, retry_s)))


def error_trailers(info: RpcInfo, mapped: MappedError, status: grpc.Status) -> Metadata:
    """The trailing metadata of an error: the rich status, the request id, a retry hint.

    A refused call sends no headers before its trailers (handlers send their initial
    metadata with the first response, a generation stream once its request is queued), so the client's gRPC retry policy may retry it:
    `grpc-retry-pushback-ms` is gRPC's own retry delay (A6), `retry-after-ms` the same
    figure for clients that retry by hand."""
    trailers: list[tuple[str, str | bytes]] = [*status.trailing_metadata]
    trailers.append((REQUEST_ID_KEY, info.request_id))
    if mapped.retry_after_s is not None:
        ms = str(retry_after_ms(mapped))
        trailers += [(RETRY_AFTER_KEY, ms), (RETRY_PUSHBACK_KEY, ms)]
    return tuple(trailers)


# -- API keys ---------------------------------------------------------------------------------

# The calls of each exemptible group (auth_exempt); every other method needs a key.
HEALTH_METHODS = (
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
REFLECTION_METHODS = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def call_group(method: str) -> str:
    """ "health", "reflection" or "inference" (never exempt) for a full method name."""
    if method.startswith(HEALTH_METHODS):
        return "health"
    if method.startswith(REFLECTION_METHODS):
        return "reflection"
    return "inference"


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


async def _refuse(request: Any, context: Context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, auth.UNAUTHENTICATED_MESSAGE)


# One refusing handler per RPC shape; requests stay bytes (nothing unauthenticated is parsed).
_REFUSALS = {
    (False, False): grpc.unary_unary_rpc_method_handler(_refuse),
    (False, True): grpc.unary_stream_rpc_method_handler(_refuse),
    (True, False): grpc.stream_unary_rpc_method_handler(_refuse),
    (True, True): grpc.stream_stream_rpc_method_handler(_refuse),
}


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """UNAUTHENTICATED (no detail) for a call without a valid API key, on every service.

    grpc.aio runs the interceptors and then the handler in one task, so the caller set
    here is the one `auth.current_caller()` returns inside the handler."""

    def __init__(self, authenticator: auth.Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        method: str = details.method
        if self.authenticator.is_exempt(call_group(method)):
            return await continuation(details)
        try:
            caller = self.authenticator.authenticate(_authorization(details.invocation_metadata))
        except auth.Unauthenticated as exc:
            name = method.rpartition("/")[2]
            log.warning(
                "auth_denied", rpc=name, method=method, reason=exc.reason, key_id=exc.key_id
            )
            REQUESTS.labels(name, "", grpc.StatusCode.UNAUTHENTICATED.name).inc()
            handler = await continuation(details)
            shape = (
                (handler.request_streaming, handler.response_streaming)
                if handler
                else (False, False)
            )
            return _REFUSALS[shape]
        auth.set_caller(caller)
        return await continuation(details)

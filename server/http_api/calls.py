"""One HTTP request from arrival to its log line: what every route shares.

`Endpoint` is a route as a bare ASGI app. It assigns the request id (the
caller's `x-request-id` or a new one), refuses work while the server loads or
drains (503), reads the body under the size limit and parses it as a JSON
object, runs the handler while watching for the client to leave, and turns
every error into OpenAI's error shape with its HTTP status (server/errors.py).
A handler returns a JSON-able dict, a ready Response, or an async iterator of
SSE events (bytes). A stream's first event is awaited before the 200 goes out,
so a full queue is still a 429 and an unknown model a 404; an error after that
is sent as a last `data: {"error": ...}` event.

An inference route's request is a call of the server's Gate (server/rpc.py),
as a gRPC call is: it counts toward the drain, its errors are classified by
the same table (`mapped_error`), and it writes the one `rpc` log line with
`front="http"`, the route as `rpc`, and `http_status` / `stream` beside the
gRPC-shaped `code`. Health, metrics and the page are outside the Gate.

A client that goes away cancels its handler (`watch_disconnect`): uvicorn
drops what is sent to a closed connection without an error, so without the
watch a generation would run to its end for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import orjson
from headrace.server.errors import ServerDraining
from headrace.server.http_api import openai_write as wire
from headrace.server.http_api.openai_read import OWN_NAMES, GenerationBody
from headrace.server.metrics import HTTP_REQUESTS
from headrace.server.rpc import RpcInfo, mapped_error, new_request_id
from headrace.server.types import InvalidArgument
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from headrace.server.http_api.front import HttpFront

REQUEST_ID = "x-request-id"
STATUS_CLIENT_GONE = 499  # logged only: the client closed the connection first
# The gRPC-shaped code of the HTTP layer's own errors, for the shared log line and metrics.
HTTP_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
}
ERROR_CODE = {
    403: "permission_denied",
    404: "model_not_found",
    429: "queue_full",
    503: "unavailable",
    500: "internal",
}


class HttpError(Exception):
    """An error of the HTTP layer itself (body too large, not JSON, unknown path)."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class ClientGone(Exception):
    """The client closed the connection while its request was running."""


@dataclass
class HttpCall(RpcInfo):
    """One request: the shared RpcInfo (`rpc` is the route) and what only HTTP has."""

    front: str = "http"
    status: int = 200
    stream: bool = False
    body: GenerationBody | None = None  # names error fields as OpenAI does
    retry_after_s: float | None = None  # a 429's hint from the queue: when a retry may succeed
    path_params: dict[str, Any] = field(default_factory=dict)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@contextlib.asynccontextmanager
async def watch_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Cancel the block when the client disconnects; it then raises ClientGone."""
    task = asyncio.current_task()
    assert task is not None
    gone = False
    active = True  # the watcher runs only while the task is suspended: inside the block iff active

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        if active:
            gone = True
            task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientGone from None
        raise
    finally:
        active = False
        watcher.cancel()


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, at most `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HttpError(413, f"the request body exceeds {limit} bytes", code="body_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise HttpError(413, f"the request body exceeds {limit} bytes", code="body_too_large")
        parts.append(part)
    try:
        data = orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError as exc:
        raise HttpError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise HttpError(400, "the request body must be a JSON object", code="invalid_json")
    return data


Handler = Callable[["HttpFront", HttpCall, Any], Awaitable[Any]]


class Endpoint:
    """One route: `handler(front, call, body)` behind the shared request handling."""

    def __init__(
        self,
        front: HttpFront,
        route: str,
        handler: Handler,
        *,
        method: str = "POST",
        inference: bool = True,
    ) -> None:
        self.front, self.route, self.handler = front, route, handler
        self.method, self.inference = method, inference

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        client = scope.get("client")
        call = HttpCall(
            rpc=self.route,
            request_id=(request.headers.get(REQUEST_ID) or "")[:128],  # none: the gate's
            peer=f"{client[0]}:{client[1]}" if client else "",
        )
        if not self.inference:
            call.request_id = call.request_id or new_request_id()
            await self._run(request, call, send)
            HTTP_REQUESTS.labels(self.route, "", str(call.status)).inc()
            return
        task = asyncio.current_task()
        assert task is not None
        self.front.gate.enter(call, request.headers, request.method)  # + span when tracing
        self.front.track(task)
        try:
            await self._run(request, call, send)
        finally:
            self.front.untrack(task)
            self._record(call)

    async def _run(self, request: Request, call: HttpCall, send: Send) -> None:
        front = self.front
        headers = {REQUEST_ID: call.request_id}
        try:
            if request.method != self.method:
                raise HttpError(405, f"{self.route} takes {self.method} requests")
            if self.inference:
                front.refuse_if_closed()
            body = await read_json(request, front.body_limit) if self.method == "POST" else None
            call.path_params = request.path_params
            async with watch_disconnect(request.receive):
                result = await self.handler(front, call, body)
                if isinstance(result, AsyncIterator):
                    await self._stream(call, result, headers, send)
                    return
            if not isinstance(result, Response):
                result = JSONResponse(result, headers=headers)
            else:
                result.headers.update(headers)
            call.status = result.status_code
            await result(request.scope, request.receive, send)
        except ClientGone:
            call.status, call.code = STATUS_CLIENT_GONE, grpc.StatusCode.CANCELLED
        except asyncio.CancelledError:
            if not self._stopped():
                call.status, call.code = STATUS_CLIENT_GONE, grpc.StatusCode.CANCELLED
                raise
            response = self._error(call, ServerDraining("the server is shutting down"))
            response.headers.update(headers)
            await response(request.scope, request.receive, send)
        except Exception as exc:
            response = self._error(call, exc)
            response.headers.update(headers)
            await response(request.scope, request.receive, send)

    async def _stream(
        self, call: HttpCall, events: AsyncIterator[bytes], headers: dict[str, str], send: Send
    ) -> None:
        """Send SSE events; the first is awaited before the status line goes out."""
        call.stream = True
        try:
            first = await anext(events, None)
            head = [(k.encode(), v.encode()) for k, v in headers.items()]
            await send({
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
                    *head,
                ],
            })  # fmt: skip
            if first is not None:
                await send({"type": "http.response.body", "body": first, "more_body": True})
                try:
                    async for data in events:
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                except asyncio.CancelledError:
                    if not self._stopped():
                        raise  # the client left (or the task is cancelled for another reason)
                    error = self._mapped(call, ServerDraining("the server is shutting down"))
                    await send({
                        "type": "http.response.body", "body": wire.sse(error), "more_body": True
                    })  # fmt: skip
                except Exception as exc:
                    error = self._mapped(call, exc)
                    await send({
                        "type": "http.response.body", "body": wire.sse(error), "more_body": True
                    })  # fmt: skip
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if hasattr(events, "aclose"):
                await events.aclose()

    def _stopped(self) -> bool:
        """True when the front cancelled this request because the server stops (past the grace
        period): the cancellation is taken back so the caller gets a 503 instead of a cut."""
        task = asyncio.current_task()
        if not self.front.stopping or task is None:
            return False
        task.uncancel()
        return True

    def _mapped(self, call: HttpCall, exc: Exception) -> dict[str, Any]:
        """-> OpenAI's error body; sets call.status and call.code (an internal cause is logged)."""
        if isinstance(exc, HttpError):
            call.status = exc.status
            call.code = HTTP_CODE.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
            return wire.error_body(exc.status, exc.message, exc.param, exc.code)
        if isinstance(exc, InvalidArgument):
            # a model check's canonical field -> the parameter as the caller wrote it:
            # ("max_new_tokens", "max_new_tokens must be in [0, 64] ...") -> ("max_tokens", ...)
            exc = exc.renamed(call.body.own_names() if call.body is not None else OWN_NAMES)
        mapped = mapped_error(call, exc)
        call.status, call.code = mapped.http_status, mapped.code
        call.retry_after_s = mapped.retry_after_s
        code = ERROR_CODE.get(call.status)
        return wire.error_body(call.status, mapped.message, mapped.field, code)

    def _error(self, call: HttpCall, exc: Exception) -> Response:
        body = self._mapped(call, exc)
        headers = {}
        if call.status in (429, 503):
            # Retry-After is whole seconds; `retry-after-ms` (read first by the openai SDKs)
            # carries the queue's own estimate, as `retry-after-ms` does on the gRPC fronts.
            hint = call.retry_after_s if call.retry_after_s is not None else 1.0
            headers["retry-after"] = str(max(1, math.ceil(hint)))
            headers["retry-after-ms"] = str(max(1, round(hint * 1000)))
        # A 413 keeps the connection: uvicorn reads and drops the rest of the body after the
        # response, where closing at once would reset the socket under the caller's upload.
        if call.status == 503 and self.front.draining:
            headers["connection"] = "close"
        if call.status == 405:
            headers["allow"] = self.method
        return JSONResponse(body, status_code=call.status, headers=headers)

    def _record(self, call: HttpCall) -> None:
        """The shared log line and request metrics (gate.finish), and the count by HTTP status."""
        HTTP_REQUESTS.labels(self.route, call.model, str(call.status)).inc()
        call.extra = {"http_status": call.status, "stream": call.stream}
        self.front.gate.finish(call)


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """Unknown paths: a 404 in OpenAI's shape."""
    path = scope.get("path", "")
    body = wire.error_body(404, f"no route {path!r}", code="unknown_route")
    await JSONResponse(body, status_code=404)(scope, receive, send)

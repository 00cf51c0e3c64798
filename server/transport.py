"""The gRPC transport's own limits, set so that none fires before the server's admission.

Past what a model's queue and slots take, a call must end RESOURCE_EXHAUSTED from our
code, with a retry hint (server/rpc.py), never be dropped by the transport. What grpc
core does by default, and what we set instead:

    grpc.server.max_pending_requests(_hard_limit)   calls the application has not yet
        picked up (grpc.aio picks them up one at a time on the event loop): core
        defaults 1,000 / 3,000, past which it cancels new calls at random (CANCELLED,
        never seen by a handler). A burst of 3,000 calls on one channel crossed it.
    grpc.server_max_unrequested_time_in_server      how long such a call may wait (30 s)
    grpc.max_concurrent_streams                     per connection: unlimited; bounded
        here, so a client queues calls on its side instead of flooding one connection
    keepalive policy                                the SDK pings every `keepalive_time`
        with `max_pings_without_data=0`; core's default policy (5 min between pings,
        2 strikes) answers that with GOAWAY "too_many_pings", ending every call on the
        connection. We allow a ping every 10 s, and ping idle clients ourselves.
    grpc.max_connection_age_ms (when configured)    for L4 load balancers: connections
        are closed after about this long so that clients spread over new replicas; its
        grace lets running calls (streams too) finish first.

`maximum_concurrent_rpcs` of grpc.aio.server stays unset: it would answer
RESOURCE_EXHAUSTED without a retry hint, before any model's queue is full.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

PENDING_CALLS = 1 << 20  # calls accepted by the transport, not yet by a handler
MAX_STREAMS_PER_CONNECTION = 16384
MIN_CLIENT_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_MS = 60_000  # ping a silent client after this long
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000


def server_options(
    max_message_bytes: int,
    *,
    max_connection_age_s: float = 0.0,
    grace_period_s: float = 10.0,
    reuse_port: bool = False,
) -> list[tuple[str, Any]]:
    """The channel arguments of grpc.aio.server."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # off unless asked (--workers): a second server on a taken port fails to start
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
        ("grpc.server_max_unrequested_time_in_server", 3600),  # seconds
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        # the keepalive enforcement policy: what a client may send
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),  # 0: never GOAWAY a client for its pings
        ("grpc.keepalive_permit_without_calls", 1),
        # our own pings, to find dead peers
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
    ]
    if max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            # running calls get the drain's grace period before the connection closes
            ("grpc.max_connection_age_grace_ms", int(max(grace_period_s, 1.0) * 1000)),
        ]
    return options


# -- requests that do not parse ------------------------------------------------------------------

UNDECODABLE_MESSAGE = (
    "the request is not a valid {name} message (corrupt protobuf or invalid UTF-8)"
)


class Undecodable:
    """What a guarded deserializer returns for bytes that do not parse: the handler answers it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _guarded(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "") or "request"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # protobuf's DecodeError, or a UnicodeDecodeError of a string field
            return Undecodable(name)

    return deserialize


async def _refuse(context: Any, request: Undecodable) -> NoReturn:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE.format(name=request.name)
    )
    raise AssertionError("abort returned")  # it raises AbortError


async def _checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        yield request


def _guard(handler: Any) -> Any:
    """`handler` with a deserializer that never raises and a behavior that refuses what it
    could not parse. grpc's own answer to a deserializer's error is UNKNOWN with the
    exception's text ("Unexpected <class 'DecodeError'>: ..."), a server error to retry."""
    guarded = _guarded(handler.request_deserializer)
    if handler.request_streaming:
        streaming = handler.stream_stream if handler.response_streaming else handler.stream_unary
        assert streaming is not None

        def wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):

                async def gen(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                    async for response in behavior(_checked(requests, context), context):
                        yield response

                return gen

            async def coro(requests: AsyncIterator[Any], context: Any) -> Any:
                return await behavior(_checked(requests, context), context)

            return coro

        key = "stream_stream" if handler.response_streaming else "stream_unary"
        return handler._replace(request_deserializer=guarded, **{key: wrap_stream(streaming)})

    unary = handler.unary_stream if handler.response_streaming else handler.unary_unary
    assert unary is not None
    if inspect.isasyncgenfunction(unary):

        async def gen_one(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for response in unary(request, context):
                yield response

        behavior: Callable[..., Any] = gen_one
    else:

        async def one(request: Any, context: Any) -> Any:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            result = unary(request, context)
            return await result if inspect.isawaitable(result) else result

        behavior = one
    key = "unary_stream" if handler.response_streaming else "unary_unary"
    return handler._replace(request_deserializer=guarded, **{key: behavior})


class GuardedRegistry:
    """What the generated `add_*Servicer_to_server` functions register on: every method's
    handler refuses bytes that do not parse with INVALID_ARGUMENT, on every service.

    The handlers are guarded once, at registration, not by a server interceptor: an
    interceptor is one more coroutine on the event loop for every call."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server: Any = server  # grpc's stubs lack add_registered_method_handlers

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        # the generated code registers the same handlers both ways: the registered ones
        # (grpc's lookup by method name, guarded below) are what calls reach
        self._server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service, {method: _guard(h) for method, h in handlers.items()}
        )


class _GuardedGeneric(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._made: dict[str, tuple[Any, Any]] = {}

    def service(self, handler_call_details: Any) -> Any:
        handler = self._inner.service(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        made = self._made.get(handler_call_details.method)
        if made is None or made[0] is not handler:
            made = (handler, _guard(handler))
            self._made[handler_call_details.method] = made
        return made[1]

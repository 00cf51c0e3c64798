"""The asyncio client (grpc.aio): the calls of `_calls`, sent as coroutines."""
# ruff: noqa: ASYNC109 - `timeout` is the gRPC deadline sent to the server, as in grpc.aio

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import grpc

from . import _calls
from ._base import ClientBase
from ._calls import Streaming, Unary
from ._channel import Settings
from ._errors import TypedErrors, Unavailable
from ._streams import AsyncResponseStream

__all__ = ["AsyncClient"]

P = ParamSpec("P")
T = TypeVar("T")


def _unary(
    spec: Callable[P, Unary[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    async def send(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        call = spec(*args, **kwargs)
        rpc: Any = self._rpcs[call.method]
        with TypedErrors(call.request_id):
            response = await rpc(call.request, **self._call_options(call))
        return call.convert(response)

    return _calls.as_method(spec, send, "AsyncClient")


def _streaming(
    spec: Callable[P, Streaming[T]],
) -> Callable[Concatenate[AsyncClient, P], AsyncResponseStream[T]]:
    def open_stream(
        self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncResponseStream[T]:
        call = spec(*args, **kwargs)
        grpc_call, request_error = self._start_stream(call, aio=True)
        return AsyncResponseStream(grpc_call, call.convert, call.request_id, request_error)

    return _calls.as_method(spec, open_stream, "AsyncClient")


class AsyncClient(ClientBase[grpc.aio.Channel]):
    """An asyncio client of a headrace server.

    Make it inside the running event loop that uses it (e.g. `async with AsyncClient(...)`):
    a grpc.aio channel belongs to one loop. Calls may run concurrently on one client.
    The arguments are those of `ClientBase.__init__`, as for `Client`.
    """

    classify = _unary(_calls.classify)
    generate = _unary(_calls.generate)
    models = _unary(_calls.models)
    health = _unary(_calls.health)
    stream = _streaming(_calls.stream)
    classify_stream = _streaming(_calls.classify_stream)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel is connected; raises Unavailable after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise Unavailable(
                grpc.StatusCode.UNAVAILABLE, f"not connected to {self.target} in {timeout}s"
            ) from None

    async def close(self, grace: float | None = None) -> None:
        """Close the channel (unless it was given).

        Calls in flight get `grace` seconds to finish, then are cancelled.
        """
        if self._owns_channel:
            await self._channel.close(grace)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _connect(self, s: Settings) -> grpc.aio.Channel:
        if s.credentials is None:
            return grpc.aio.insecure_channel(s.target, s.options, s.compression)
        return grpc.aio.secure_channel(s.target, s.credentials, s.options, s.compression)

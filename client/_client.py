"""The synchronous client: the calls of `_calls`, sent blocking."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import grpc

from . import _calls
from ._base import DEFAULT_TARGET, ClientBase
from ._calls import Streaming, Unary
from ._channel import Settings
from ._errors import TypedErrors, Unavailable
from ._streams import ResponseStream

__all__ = ["DEFAULT_TARGET", "Client"]

P = ParamSpec("P")
T = TypeVar("T")


def _unary(spec: Callable[P, Unary[T]]) -> Callable[Concatenate[Client, P], T]:
    def send(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        call = spec(*args, **kwargs)
        rpc: Any = self._rpcs[call.method]
        with TypedErrors(call.request_id):
            response = rpc(call.request, **self._call_options(call))
        return call.convert(response)

    return _calls.as_method(spec, send, "Client")


def _streaming(
    spec: Callable[P, Streaming[T]],
) -> Callable[Concatenate[Client, P], ResponseStream[T]]:
    def open_stream(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> ResponseStream[T]:
        call = spec(*args, **kwargs)
        grpc_call, request_error = self._start_stream(call, aio=False)
        return ResponseStream(grpc_call, call.convert, call.request_id, request_error)

    return _calls.as_method(spec, open_stream, "Client")


class Client(ClientBase[grpc.Channel]):
    """A blocking client of a headrace server; safe to share between threads.

    `Client(target, ...)` opens the channel; the arguments are those of
    `ClientBase.__init__` (TLS, metadata, deadlines, retries, balancing, keepalive).
    """

    classify = _unary(_calls.classify)
    generate = _unary(_calls.generate)
    models = _unary(_calls.models)
    health = _unary(_calls.health)
    stream = _streaming(_calls.stream)
    classify_stream = _streaming(_calls.sync_requests(_calls.classify_stream))

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel is connected; raises Unavailable after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(
                grpc.StatusCode.UNAVAILABLE, f"not connected to {self.target} in {timeout}s"
            ) from None

    def close(self) -> None:
        """Close the channel (unless it was given); calls in flight are cancelled."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connect(self, s: Settings) -> grpc.Channel:
        if s.credentials is None:
            return grpc.insecure_channel(s.target, s.options, s.compression)
        return grpc.secure_channel(s.target, s.credentials, s.options, s.compression)

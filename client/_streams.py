"""Iterators over streaming calls that cancel the call when the caller stops early.

grpcio does not cancel a streaming call whose iterator is abandoned: the server
would go on generating for nobody. These wrappers cancel on `close()` / `aclose()`,
on leaving a `with` block, and when garbage collected before the stream ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, Self, TypeAlias, TypeVar

import grpc
from headrace.v1 import inference_pb2 as pb

from . import _convert
from ._errors import HeadraceError, error_from_aio_rpc_error, error_from_rpc_error
from ._types import ClassifyInput

__all__ = ["AsyncResponseStream", "RequestFeeder", "ResponseStream"]

T = TypeVar("T")
# End-of-stream marker of grpc.aio `read()`; grpc-stubs does not declare it.
_EOF: object = getattr(grpc.aio, "EOF")  # noqa: B009


E = TypeVar("E", bound=BaseException)


class _Stream(Generic[T]):
    """What both wrappers share: the call, the conversion, ending and cancelling."""

    def __init__(
        self,
        call: Any,
        convert: Callable[[Any], T],
        request_id: str | None = None,
        request_error: Callable[[], BaseException | None] | None = None,
    ) -> None:
        # a grpc.Call that is also an iterator of responses, or a grpc.aio
        # UnaryStreamCall / StreamStreamCall
        self._call = call
        self._convert = convert
        self._request_id = request_id
        # An exception raised while producing requests (bidi), to report instead of
        # the status grpc makes up for it.
        self._request_error = request_error
        self._done = False
        self._closed = False
        self._cancelled = False

    def cancel(self) -> None:
        """Cancel the call; iteration then ends without an error."""
        if self._closed:
            return
        self._closed = True
        if not self._done:
            self._cancelled = True
            self._call.cancel()

    @property
    def cancelled(self) -> bool:
        """True when this stream cancelled its call before it ended."""
        return self._cancelled

    def _own_error(self) -> BaseException | None:
        return self._request_error() if self._request_error else None

    def _failure(
        self, err: E, translate: Callable[[E, str | None], HeadraceError]
    ) -> BaseException | None:
        """What to raise now that the call failed with `err`: None (end quietly) once
        closed, else the requests' own error, else the typed error of the status."""
        self._done = True
        if self._closed:
            return None
        own = self._own_error()
        return own if own is not None else translate(err, self._request_id)

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:
            pass


class ResponseStream(_Stream[T]):
    """The responses of a streaming call, converted, in order (sync).

    Iterate it; errors surface as `HeadraceError` while iterating. Stopping early
    (`break`) and dropping it, `close()`, or leaving `with` cancels the call. After
    `close()` iteration ends quietly. `close()` may be called from another thread.
    """

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        if self._closed or self._done:
            raise StopIteration
        try:
            msg = next(self._call)
        except StopIteration:
            self._done = True
            raise
        except grpc.RpcError as err:
            failure = self._failure(err, error_from_rpc_error)
            if failure is None:
                raise StopIteration from None
            raise failure from err
        return self._convert(msg)

    def close(self) -> None:
        """Cancel the call unless it has ended (the same as `cancel()`)."""
        self.cancel()

    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(self._call.initial_metadata() or ())

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The trailers; blocks until the call ends."""
        return tuple(self._call.trailing_metadata() or ())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncResponseStream(_Stream[T]):
    """The responses of a streaming call, converted, in order (asyncio).

    `async for` over it; errors surface as `HeadraceError` while iterating.
    `aclose()`, leaving `async with`, or dropping it before the end cancels the call.
    """

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if self._closed or self._done:
            raise StopAsyncIteration
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as err:
            failure = self._failure(err, error_from_aio_rpc_error)
            if failure is None:
                raise StopAsyncIteration from None
            raise failure from err
        except asyncio.CancelledError:
            # Our own task is being cancelled (stop the call and propagate), or the call
            # was cancelled by aclose() from another task (end quietly), or grpc.aio
            # cancelled it because reading the requests raised (report that error).
            task = asyncio.current_task()
            if not (task is not None and task.cancelling()):
                own = self._own_error()
                if own is not None:
                    self._done = True
                    raise own from None
                if self._closed:
                    raise StopAsyncIteration from None
            self.cancel()
            raise
        if msg is _EOF:
            self._done = True
            raise StopAsyncIteration
        return self._convert(msg)

    async def aclose(self) -> None:
        """Cancel the call unless it has ended (the same as `cancel()`)."""
        self.cancel()

    async def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(await self._call.initial_metadata() or ())

    async def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The trailers; waits until the call ends."""
        return tuple(await self._call.trailing_metadata() or ())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


ClassifyItem: TypeAlias = ClassifyInput | str | Sequence[str]


class RequestFeeder:
    """Turns the caller's items into ClassifyRequests for a bidi call.

    An exception raised while reading the items (or converting one) is kept: grpc
    would log it and fail the call with UNKNOWN, the stream re-raises it as it was.
    """

    def __init__(
        self,
        items: Iterable[ClassifyItem] | AsyncIterable[ClassifyItem],
        model: str,
        version: str,
        top_k: int,
        reject_overlong: bool,
    ) -> None:
        self._items = items
        self._model = model
        self._version = version
        self._top_k = top_k
        self._reject_overlong = reject_overlong
        self._error: BaseException | None = None

    def _request(self, item: ClassifyItem) -> pb.ClassifyRequest:
        return _convert.classify_stream_request(
            item,
            model=self._model,
            version=self._version,
            top_k=self._top_k,
            reject_overlong=self._reject_overlong,
        )

    def __iter__(self) -> Iterator[pb.ClassifyRequest]:
        if not isinstance(self._items, Iterable):
            raise TypeError("the sync client takes an Iterable of requests")
        try:
            for item in self._items:
                yield self._request(item)
        except Exception as err:
            self._error = err
            raise

    async def __aiter__(self) -> AsyncIterator[pb.ClassifyRequest]:
        try:
            if isinstance(self._items, AsyncIterable):
                async for item in self._items:
                    yield self._request(item)
            else:
                for item in self._items:
                    yield self._request(item)
        except Exception as err:
            self._error = err
            raise

    def error(self) -> BaseException | None:
        return self._error

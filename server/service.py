"""The `headrace.v1.Inference` servicer on grpc.aio: convert -> model (checks, runs) -> convert.

One decorator, `rpc`, wraps every method, unary and streaming alike: it
assigns the request id (sent in the headers of the first response, a generation
stream's once its request is queued, or in the
trailers of an error), refuses calls while the server drains, maps errors
to status codes (server/errors.py), writes the one log line per RPC and the
request metrics (the pieces every front shares are in server/rpc.py). Cancellation (client gone, deadline passed) is re-raised,
never swallowed, and every generation stream is closed in a `finally` so the
engine frees its KV slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from headrace.server import auth, convert
from headrace.server.models import ClassifierModel, GeneratorModel
from headrace.server.repository import ModelRepository
from headrace.server.rpc import (
    REQUEST_ID_KEY,
    Context,
    Gate,
    RpcInfo,
    abort_for,
    is_sendable_id,
    metadata_request_id,
    new_request_id,
    unsendable_id,
)
from headrace.server.types import Task
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

STREAM_WINDOW = 8  # ClassifyStream requests in flight at once per stream (answers keep order)


def rpc(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a servicer method `(self, request, context, info)` as a grpc.aio handler."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def stream_handler(
                self: InferenceService, request: Any, context: Context
            ) -> AsyncIterator[Any]:
                info = self._begin(name, request, context)
                try:
                    self.gate.admit(info)
                    async with contextlib.aclosing(fn(self, request, context, info)) as messages:
                        first = True
                        async for message in messages:
                            if first:
                                await (info.headers or self._headers(info, context))
                                first = False
                            yield message
                except BaseException as exc:
                    await _settled(info.headers)  # no status while the headers are in flight
                    await abort_for(info, context, exc)
                finally:
                    self.gate.finish(info)

            return stream_handler

        @functools.wraps(fn)
        async def unary_handler(self: InferenceService, request: Any, context: Context) -> Any:
            info = self._begin(name, request, context)
            try:
                self.gate.admit(info)
                # The id rides in the trailers, sent with the answer: initial metadata of
                # its own would be one more batch on the transport per call, and a call
                # refused before its answer stays trailers-only (retryable by gRPC's policy).
                context.set_trailing_metadata(((REQUEST_ID_KEY, info.request_id),))
                return await fn(self, request, context, info)
            except BaseException as exc:
                await abort_for(info, context, exc)
            finally:
                self.gate.finish(info)

        return unary_handler

    return decorate


async def _settled(headers: asyncio.Future[None] | None) -> None:
    """Wait for an early headers send to end, however it ends (its error is the call's)."""
    if headers is not None:
        await asyncio.wait((headers,))
        if not headers.cancelled():
            headers.exception()  # retrieved: the call's own error says what happened


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, repository: ModelRepository, gate: Gate | None = None) -> None:
        self.repository = repository
        self.gate = gate or Gate()  # shared with the server's other fronts

    @property
    def draining(self) -> bool:
        return self.gate.draining

    # -- the decorator's helpers -------------------------------------------------------------

    def _begin(self, name: str, request: Any, context: Context) -> RpcInfo:
        own = getattr(request, "request_id", "")  # "" for ClassifyStream's request iterator
        return self.gate.begin(name, own, context, front="native")

    async def _headers(self, info: RpcInfo, context: Context) -> None:
        # A stream's id goes with its first response (a generation's: once it is queued, so
        # the send overlaps the prefill: 0.2-0.5 ms off the time to first token), not before:
        # a call refused before it (a full queue, a drain) ends trailers-only, which gRPC's
        # retry policy may retry.
        await context.send_initial_metadata(((REQUEST_ID_KEY, info.request_id),))

    # -- classify ----------------------------------------------------------------------------

    async def _classify_one(
        self, request: pb.ClassifyRequest, request_id: str, info: RpcInfo
    ) -> pb.ClassifyResponse:
        call = convert.classify_call(request, request_id)
        auth.authorize_model(call.model or self.repository.default_name(Task.CLASSIFY) or "")
        async with self.repository.lease(call.model, call.version, ClassifierModel) as lease:
            info.model, info.model_version = lease.name, lease.version
            items = await lease.model.classify(call)
        response = convert.classify_response(
            items, model=lease.name, version=lease.version, request_id=request_id
        )
        info.prompt_tokens += response.usage.prompt_tokens
        return response

    @rpc("Classify")
    async def Classify(
        self, request: pb.ClassifyRequest, context: Context, info: RpcInfo
    ) -> pb.ClassifyResponse:
        return await self._classify_one(request, info.request_id, info)

    @rpc("ClassifyStream")
    async def ClassifyStream(
        self,
        requests: AsyncIterator[pb.ClassifyRequest],
        context: Context,
        info: RpcInfo,
    ) -> AsyncIterator[pb.ClassifyResponse]:
        # Up to STREAM_WINDOW requests run at once (so the batcher can group them);
        # answers leave in request order. The first error ends the stream.
        window = asyncio.Semaphore(STREAM_WINDOW)
        queue: asyncio.Queue[asyncio.Task[pb.ClassifyResponse] | BaseException | None]
        queue = asyncio.Queue()
        stream_id = metadata_request_id(context)

        async def read() -> None:
            try:
                async for request in requests:
                    await window.acquire()
                    if request.request_id and not is_sendable_id(request.request_id):
                        raise unsendable_id("request_id")  # as on Classify: one rule
                    rid = request.request_id or stream_id or new_request_id()
                    queue.put_nowait(asyncio.create_task(self._classify_one(request, rid, info)))
            except Exception as exc:
                queue.put_nowait(exc)
            else:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        # only the requests still running: a stream may carry millions over its life
        running: set[asyncio.Task[pb.ClassifyResponse]] = set()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                running.add(item)
                try:
                    response = await item
                finally:
                    running.discard(item)
                window.release()
                yield response
        finally:
            reader.cancel()
            while not queue.empty():  # started by the reader, not yet awaited here
                if isinstance(item := queue.get_nowait(), asyncio.Task):
                    running.add(item)
            for task in running:
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)

    # -- generate ----------------------------------------------------------------------------

    @rpc("Generate")
    async def Generate(
        self, request: pb.GenerateRequest, context: Context, info: RpcInfo
    ) -> pb.GenerateResponse:
        response = pb.GenerateResponse(request_id=info.request_id)
        texts: list[str] = []
        async with contextlib.aclosing(self._generate(request, info, None)) as chunks:
            async for chunk in chunks:
                texts.append(chunk.text)
                response.token_ids.extend(chunk.token_ids)
                if chunk.model:
                    response.model, response.model_version = chunk.model, chunk.model_version
                    response.prompt_truncated = chunk.prompt_truncated
                if chunk.finish_reason:
                    response.finish_reason = chunk.finish_reason
                    response.usage.CopyFrom(chunk.usage)
        response.text = "".join(texts)
        return response

    @rpc("GenerateStream")
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Context, info: RpcInfo
    ) -> AsyncIterator[pb.GenerateChunk]:
        async with contextlib.aclosing(self._generate(request, info, context)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _generate(
        self, request: pb.GenerateRequest, info: RpcInfo, stream: Context | None
    ) -> AsyncGenerator[pb.GenerateChunk, None]:
        """The chunks of one generation; `stream`: a GenerateStream's context, whose headers
        leave once the request is queued (a full queue still ends trailers-only)."""
        call = convert.generate_call(request, info.request_id)
        auth.authorize_model(call.model or self.repository.default_name(Task.GENERATE) or "")
        async with self.repository.lease(call.model, call.version, GeneratorModel) as lease:
            info.model, info.model_version = lease.name, lease.version
            model = lease.model
            params, truncated = model.prepare(call)
            info.prompt_tokens = len(params.prompt_ids)
            on_queued = None
            if stream is not None:

                def on_queued() -> None:
                    info.headers = asyncio.ensure_future(self._headers(info, stream))

            events = model.generate(params, on_queued)
            first = True
            try:
                async for event in events:
                    chunk = convert.generate_chunk(event, info.request_id)
                    if first:
                        chunk.model, chunk.model_version = lease.name, lease.version
                        chunk.prompt_truncated = truncated
                        first = False
                    if event.finish_reason is not None:
                        info.prompt_tokens = event.prompt_tokens
                        info.completion_tokens = event.completion_tokens
                    else:
                        info.completion_tokens += len(event.token_ids)
                    yield chunk
            finally:
                # Frees the KV slot when the caller cancelled or the deadline passed.
                await events.aclose()

    # -- models ------------------------------------------------------------------------------

    @rpc("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context, info: RpcInfo
    ) -> pb.ListModelsResponse:
        task = convert.TASK_FROM_PB.get(request.task)
        entries = self.repository.list_models(task)
        visible = set(auth.allowed_models(e.name for e in entries))  # a scoped key: its models
        entries = [e for e in entries if e.name in visible]
        profile = self.repository.profile
        return pb.ListModelsResponse(models=[convert.model_info(e, profile) for e in entries])

"""`inference.GRPCInferenceService` (Open Inference Protocol, KServe v2) on grpc.aio.

The same repository, batcher and decode loop as headrace.v1.Inference: a
ModelInfer and a native Classify for one model share a batch, and a
ModelStreamInfer stream that ends (client gone, cancelled) closes its
generations, which frees their KV slots at the next engine step.

    tensors -> convert (server/kserve/convert.py) -> model -> convert -> tensors

ServerLive, ServerReady and ModelReady are probes: never refused, never
logged. Every other call goes through the server's Gate (server/rpc.py):
UNAVAILABLE while draining, one `rpc` log line with front="kserve", errors
mapped by server/errors.py with the tensor named (INVALID_ARGUMENT carries a
BadRequest whose field is the tensor's name: a model's check failure, raised with
the canonical field of server/calls.py, is renamed by convert.tensor_error). Inside ModelStreamInfer a
failed request answers `error_message` and the stream goes on, as Triton does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from importlib import metadata
from typing import Any

import grpc
from headrace.server import auth
from headrace.server.errors import MappedError
from headrace.server.kserve import convert
from headrace.server.kserve.pb import grpc_service_pb2 as pb
from headrace.server.kserve.pb import grpc_service_pb2_grpc as pb_grpc
from headrace.server.kserve.tensors import bad, read_inputs, set_param, wants_raw, write_outputs
from headrace.server.model_state import ModelState
from headrace.server.models import ClassifierModel, GeneratorModel
from headrace.server.repository import LoadedVersion, ModelRepository, version_key
from headrace.server.rpc import Context, Gate, RpcInfo, abort_for, mapped_error
from headrace.server.types import GenerateCall, InvalidArgument, Task, TokenEvent

STREAM_WINDOW = 64  # requests of one ModelStreamInfer stream running at once
FINAL = "triton_final_response"  # response parameter of decoupled streams (Triton's name)
ENABLE_FINAL = "triton_enable_empty_final_response"  # request parameter asking for it


def _version() -> str:
    try:
        return metadata.version("headrace")
    except metadata.PackageNotFoundError:
        return "0"


def kserve_status(info: RpcInfo, exc: Exception) -> MappedError:
    """The status of server/errors.py (tensor names are given by convert.tensor_error)."""
    return mapped_error(info, exc)


def unary(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap `(self, request, context, info)` as a gated, logged grpc.aio unary handler."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def handler(self: OpenInferenceService, request: Any, context: Context) -> Any:
            own_id = getattr(request, "id", "")
            info = self.gate.begin(name, own_id, context, front="kserve", id_field="id")
            try:
                self.gate.admit(info)
                return await fn(self, request, context, info)
            except BaseException as exc:
                await abort_for(info, context, exc, _status_of(info, exc))
            finally:
                self.gate.finish(info)

        return handler

    return decorate


def _status_of(info: RpcInfo, exc: BaseException) -> MappedError | None:
    """kserve_status for an error to map; None for cancellation and aborts (abort_for's own)."""
    if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
        return kserve_status(info, exc)
    return None


# Triton's repository index states for ours
TRITON_STATE = {
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.RETIRING: "UNLOADING",
}


class OpenInferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, gate: Gate) -> None:
        self.repository = repository
        self.gate = gate  # shared with headrace.v1.Inference: one drain for both

    # -- probes ------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=not self.gate.stopping)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        if not auth.current_caller().may_use(request.name):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, auth.forbidden_message(request.name)
            )
        # False for a model whose versions are loading or failed (ModelMetadata says why)
        versions = {v.version for v in self.repository.versions(request.name)}
        version = version_key(request.version)
        ready = bool(versions) and (not version or version in versions)
        return pb.ModelReadyResponse(ready=ready and not self.gate.stopping)

    # -- metadata ----------------------------------------------------------------------------

    def _versions(self, name: str, version: str = "") -> list[LoadedVersion]:
        """Served versions of `name`, newest first (the asked one first when given)."""
        if not name:
            raise InvalidArgument("model_name", "model_name must name a served model")
        auth.authorize_model(name)  # before the lookup: a scoped key learns no other names
        # NOT_FOUND for a name never seen, UNAVAILABLE for one loading or failed
        return self.repository.served_versions(name, version)

    def _backend(self, loaded: LoadedVersion) -> str:
        return loaded.choice.backend

    @unary("ServerMetadata")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context, info: RpcInfo
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="headrace", version=_version(), extensions=["model_configuration"]
        )

    @unary("ModelMetadata")
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context, info: RpcInfo
    ) -> pb.ModelMetadataResponse:
        versions = self._versions(request.name, request.version)
        info.model = versions[0].name
        return convert.model_metadata(versions, self._backend(versions[0]))

    @unary("ModelConfig")
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context, info: RpcInfo
    ) -> pb.ModelConfigResponse:
        loaded = self._versions(request.name, request.version)[0]
        info.model, info.model_version = loaded.name, loaded.version
        return pb.ModelConfigResponse(config=convert.model_config(loaded, self._backend(loaded)))

    @unary("RepositoryIndex")
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context, info: RpcInfo
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse()
        entries = self.repository.list_models()
        visible = set(auth.allowed_models(e.name for e in entries))
        for entry in (e for e in entries if e.name in visible):
            for s in entry.statuses:
                index.models.add(
                    name=entry.name,
                    version=s.version,
                    state=TRITON_STATE[s.state],
                    reason=s.reason,
                )
        return index

    @unary("RepositoryModelLoad")
    async def RepositoryModelLoad(self, request: Any, context: Context, info: RpcInfo) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "headrace loads a model version when its folder appears in the model repository "
            "(NAME/VERSION/ with headrace.json); there is no load call",
        )

    @unary("RepositoryModelUnload")
    async def RepositoryModelUnload(self, request: Any, context: Context, info: RpcInfo) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "headrace unloads a model version when its folder leaves the model repository; "
            "there is no unload call",
        )

    @unary("ModelStatistics")
    async def ModelStatistics(self, request: Any, context: Context, info: RpcInfo) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "headrace exports its statistics as Prometheus metrics (--metrics-port, /metrics)",
        )

    # -- inference ---------------------------------------------------------------------------

    @unary("ModelInfer")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context, info: RpcInfo
    ) -> pb.ModelInferResponse:
        loaded = self._versions(request.model_name, request.model_version)[0]
        if loaded.manifest.task is Task.CLASSIFY:
            return await self._classify(request, loaded, info)
        async with contextlib.aclosing(self._generate(request, loaded, info, False)) as answers:
            responses = [response async for response in answers]
        return responses[-1]  # unary: the one response, with the whole text

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        info = self.gate.begin("ModelStreamInfer", "", context, front="kserve")
        try:
            self.gate.refuse_if_draining()
            async with contextlib.aclosing(self._stream(requests, info)) as responses:
                async for response in responses:
                    yield response
        except BaseException as exc:
            await abort_for(info, context, exc, _status_of(info, exc))
        finally:
            self.gate.finish(info)

    async def _stream(
        self, requests: AsyncIterator[pb.ModelInferRequest], info: RpcInfo
    ) -> AsyncGenerator[pb.ModelStreamInferResponse, None]:
        # Requests run concurrently (classify requests batch, generations decode side by
        # side); their responses interleave as they are made, each with its request's id.
        queue: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        running: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                self.gate.refuse_if_draining()
                async with contextlib.aclosing(self._answers(request, info, True)) as answers:
                    async for answer in answers:
                        queue.put_nowait(pb.ModelStreamInferResponse(infer_response=answer))
            except Exception as exc:
                mapped = kserve_status(info, exc)
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                queue.put_nowait(
                    pb.ModelStreamInferResponse(error_message=mapped.message, infer_response=failed)
                )
            finally:
                window.release()

        async def read() -> None:
            try:
                async for request in requests:
                    await window.acquire()
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                yield item
            await reader  # raises what ended the request side, if it failed
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()  # closes their generations: KV slots free at the next step
            await asyncio.gather(reader, *running, return_exceptions=True)

    async def _answers(
        self, request: pb.ModelInferRequest, info: RpcInfo, streaming: bool
    ) -> AsyncGenerator[pb.ModelInferResponse, None]:
        """The responses to one request: one, or one per text chunk for a streamed generation."""
        loaded = self._versions(request.model_name, request.model_version)[0]
        if loaded.manifest.task is Task.CLASSIFY:
            yield await self._classify(request, loaded, info)
            return
        async with contextlib.aclosing(self._generate(request, loaded, info, streaming)) as answers:
            async for answer in answers:
                yield answer

    async def _classify(
        self, request: pb.ModelInferRequest, loaded: LoadedVersion, info: RpcInfo
    ) -> pb.ModelInferResponse:
        tensors = read_inputs(request)
        wanted = convert.requested_outputs(request, [convert.LABEL, convert.PROBABILITIES])
        call = convert.classify_call(tensors, loaded.name, loaded.version, info.request_id)
        async with self.repository.lease(call.model, call.version, ClassifierModel) as lease:
            info.model, info.model_version = lease.name, lease.version
            try:
                items = await lease.model.classify(call)
            except InvalidArgument as exc:
                raise convert.tensor_error(exc) from None
        info.prompt_tokens += sum(item.input_tokens for item in items)
        out = pb.ModelInferResponse(
            model_name=lease.name, model_version=lease.version, id=request.id
        )
        outputs = convert.classify_outputs(items, lease.manifest.labels, wanted)
        write_outputs(out, outputs, raw=wants_raw(request))
        return out

    async def _generate(
        self,
        request: pb.ModelInferRequest,
        loaded: LoadedVersion,
        info: RpcInfo,
        streaming: bool,
    ) -> AsyncGenerator[pb.ModelInferResponse, None]:
        tensors = read_inputs(request)
        raw = wants_raw(request)
        infer = convert.generate_call(tensors, loaded.name, loaded.version, info.request_id)
        call = infer.call
        async with self.repository.lease(call.model, call.version, GeneratorModel) as lease:
            info.model, info.model_version = lease.name, lease.version

            def response() -> pb.ModelInferResponse:
                return pb.ModelInferResponse(
                    model_name=lease.name, model_version=lease.version, id=request.id
                )

            convert.requested_outputs(request, [convert.TEXT_OUTPUT])
            if infer.stream and not streaming:
                raise bad(
                    convert.STREAM,
                    "a streamed generation needs ModelStreamInfer (the model is decoupled)",
                )
            final = streaming and _flag(request, ENABLE_FINAL)
            pending = [call.prompt] if infer.include_prompt else []
            async with contextlib.aclosing(self._events(lease.model, call, info)) as events:
                async for event in events:
                    pending.append(event.text)
                    if event.finish_reason is None and not (infer.stream and event.text):
                        continue  # the whole text comes at the end; streams skip empty chunks
                    text, pending = "".join(pending), []
                    out = response()
                    write_outputs(out, [convert.text_output(text)], raw=raw)
                    if event.finish_reason is not None:
                        convert.generate_parameters(
                            out, event.finish_reason.value, event.prompt_tokens,
                            event.completion_tokens,
                        )  # fmt: skip
                    if final:
                        set_param(out.parameters[FINAL], False)
                    yield out
            if final:
                last = response()
                set_param(last.parameters[FINAL], True)
                yield last

    async def _events(
        self, model: GeneratorModel, call: GenerateCall, info: RpcInfo
    ) -> AsyncGenerator[TokenEvent, None]:
        try:
            params, _ = model.prepare(call)
        except InvalidArgument as exc:
            raise convert.tensor_error(exc) from None
        info.prompt_tokens += len(params.prompt_ids)
        events = model.generate(params)
        try:
            async for event in events:
                if event.finish_reason is not None:
                    info.completion_tokens += event.completion_tokens
                yield event
        finally:
            await events.aclose()  # frees the KV slot when the stream was cancelled


def _flag(request: pb.ModelInferRequest, key: str) -> bool:
    p = request.parameters.get(key)
    return p is not None and p.WhichOneof("parameter_choice") == "bool_param" and p.bool_param

"""A scripted Inference server on a real localhost socket, for testing the client SDK.

The servicer answers from the request's `model` name (a script word), records what
it received (metadata, requests, attempts) and whether streams were cancelled.
It runs on grpc.aio in a thread of its own, so sync and async clients both reach it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

LABELS = ("negative", "neutral", "positive")


def rich_abort_metadata(
    code: grpc.StatusCode,
    message: str,
    *,
    field_name: str | None = None,
    request_id: str | None = None,
    reason: str | None = None,
    retry_delay: float | None = None,
) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying a google.rpc.Status with rich details."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if field_name is not None:
        bad = error_details_pb2.BadRequest()
        bad.field_violations.add(field=field_name, description=message)
        status.details.add().Pack(bad)
    if request_id is not None:
        status.details.add().Pack(error_details_pb2.RequestInfo(request_id=request_id))
    if reason is not None:
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="headrace"))
    if retry_delay is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_delay * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return (("grpc-status-details-bin", status.SerializeToString()),)


@dataclass
class Record:
    """What the servicer saw; read from the test thread."""

    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    attempts: collections.Counter[str] = field(default_factory=collections.Counter)
    metadata: list[dict[str, str]] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    cancelled: dict[str, threading.Event] = field(default_factory=dict)
    finished: dict[str, threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def event(self, table: dict[str, threading.Event], key: str) -> threading.Event:
        with self.lock:
            return table.setdefault(key, threading.Event())


class ScriptedInference(pb_grpc.InferenceServicer):
    """Behaviour by model name:

    "" / "tiny": answers; "bad": INVALID_ARGUMENT with BadRequest(field "texts[1]"),
    RequestInfo and ErrorInfo; "missing": NOT_FOUND; "busy": RESOURCE_EXHAUSTED with
    RetryInfo; "aborted": ABORTED; "flaky": UNAVAILABLE on the first attempt of each
    request_id; "down": always UNAVAILABLE; "slow": sleeps 1 s; "auth": UNAUTHENTICATED
    without `authorization: Bearer good`; "echo-md": answers with metadata as labels.
    """

    def __init__(self, name: str = "server") -> None:
        self.name = name
        self.record = Record()

    def _seen(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> dict[str, str]:
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        with self.record.lock:
            self.record.calls[method] += 1
            self.record.metadata.append(md)
            self.record.requests.append(request)
        return md

    async def _script(self, model: str, request_id: str, md: dict[str, str], context: Any) -> None:
        if model == "bad":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "texts[1] must not be empty",
                trailing_metadata=rich_abort_metadata(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "texts[1] must not be empty",
                    field_name="texts[1]",
                    request_id="srv-req-7",
                    reason="EMPTY_TEXT",
                ),
            )
        if model == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "model 'missing' is not served")
        if model == "busy":
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "queue full",
                trailing_metadata=rich_abort_metadata(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_delay=0.25
                ),
            )
        if model == "aborted":
            await context.abort(grpc.StatusCode.ABORTED, "aborted")
        if model in ("flaky", "down"):
            with self.record.lock:
                self.record.attempts[request_id] += 1
                first = self.record.attempts[request_id] == 1
            if first or model == "down":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if model == "slow":
            await asyncio.sleep(1.0)
        if model == "auth" and md.get("authorization") != "Bearer good":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

    def _classify(self, request: pb.ClassifyRequest, md: dict[str, str]) -> pb.ClassifyResponse:
        results = []
        for i, text in enumerate(request.texts):
            names = list(LABELS) if request.model != "echo-md" else sorted(md)
            scores = [0.2, 0.3, 0.5] if request.model != "echo-md" else [0.0] * len(names)
            labels = sorted(zip(names, scores, strict=False), key=lambda x: -x[1])
            if request.top_k:
                labels = labels[: request.top_k]
            results.append(
                pb.Classification(
                    labels=[pb.Label(name=n, score=s) for n, s in labels],
                    truncated=len(text) > 10,
                    input_tokens=min(len(text), 10) + i,
                )
            )
        return pb.ClassifyResponse(
            model=request.model or "tiny",
            model_version=request.model_version or "3",
            results=results,
            request_id=request.request_id or "srv-made",
            usage=pb.Usage(prompt_tokens=sum(r.input_tokens for r in results)),
        )

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        md = self._seen("Classify", request, context)
        await self._script(request.model, request.request_id, md, context)
        return self._classify(request, md)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: Any
    ) -> AsyncIterator[pb.ClassifyResponse]:
        md = self._seen("ClassifyStream", None, context)
        async for request in request_iterator:
            with self.record.lock:
                self.record.requests.append(request)
            await self._script(request.model, request.request_id, md, context)
            yield self._classify(request, md)

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        md = self._seen("Generate", request, context)
        await self._script(request.model, request.request_id, md, context)
        text = request.prompt.upper()
        return pb.GenerateResponse(
            model=request.model or "gen",
            model_version="1",
            text=text,
            token_ids=[ord(c) for c in text],
            finish_reason=pb.STOP if request.stop else pb.LENGTH,
            usage=pb.Usage(prompt_tokens=len(request.prompt), completion_tokens=len(text)),
            request_id=request.request_id or "srv-made",
            prompt_truncated=request.reject_overlong,
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        md = self._seen("GenerateStream", request, context)
        rid = request.request_id
        ended = False  # by the script: finished, or aborted

        def on_done(_: Any) -> None:
            # The call ended before the script did: the client cancelled. A cancel that
            # lands while a chunk is being written never raises CancelledError in here.
            if not ended:
                self.record.event(self.record.cancelled, rid).set()

        context.add_done_callback(on_done)
        try:
            await self._script(request.model, rid, md, context)
            # "endless": a chunk every 20 ms until cancelled (or 10 s); else one per char.
            n = 500 if request.model == "endless" else len(request.prompt)
            for i in range(n):
                if request.model == "fail-mid" and i == 2:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "stop[0] too long",
                        trailing_metadata=rich_abort_metadata(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "stop[0] too long",
                            field_name="stop[0]",
                        ),
                    )
                last = i == n - 1
                yield pb.GenerateChunk(
                    text=request.prompt[i] if i < len(request.prompt) else "x",
                    token_ids=[i],
                    finish_reason=pb.EOS if last else pb.FINISH_REASON_UNSPECIFIED,
                    usage=pb.Usage(prompt_tokens=3, completion_tokens=n) if last else None,
                    request_id=rid,
                    model="gen" if i == 0 else "",
                    model_version="1" if i == 0 else "",
                )
                if request.model == "endless":
                    await asyncio.sleep(0.02)
            ended = True
            self.record.event(self.record.finished, rid).set()
        except asyncio.CancelledError:
            self.record.event(self.record.cancelled, rid).set()
            raise
        except BaseException:
            ended = True
            raise

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        self._seen("ListModels", request, context)
        models = [
            pb.ModelInfo(
                name="tiny",
                versions=["3", "2"],
                task=pb.TASK_CLASSIFY,
                labels=list(LABELS),
                backend="onnxruntime",
                profile="edge",
                limits=pb.ModelLimits(max_input_tokens=128, max_texts=64, max_batch=32),
                precision="int8",
                device="cpu",
                is_default=True,
            ),
            pb.ModelInfo(
                name="gen",
                versions=["1"],
                task=pb.TASK_GENERATE,
                backend="torch",
                profile="cpu",
                limits=pb.ModelLimits(max_input_tokens=256, max_new_tokens=64, max_stop_strings=4),
            ),
        ]
        if request.task:
            models = [m for m in models if m.task == request.task]
        return pb.ListModelsResponse(models=models)


class ServerThread:
    """A grpc.aio server running its own event loop in a daemon thread."""

    def __init__(
        self, servicer: ScriptedInference, credentials: grpc.ServerCredentials | None = None
    ) -> None:
        self.servicer = servicer
        self._credentials = credentials
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def record(self) -> Record:
        return self.servicer.record

    def _run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(self.servicer, self._server)
        checker = health.aio.HealthServicer()
        await checker.set("headrace.v1.Inference", health_pb2.HealthCheckResponse.SERVING)
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, self._server)
        if self._credentials is None:
            port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            port = self._server.add_secure_port("127.0.0.1:0", self._credentials)
        await self._server.start()
        return port

    def start(self) -> ServerThread:
        self._thread.start()
        self.port = self._run(self._start())
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._run(self._server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    srv = ServerThread(ScriptedInference()).start()
    yield srv
    srv.stop()


@pytest.fixture()
def fresh_server() -> Iterator[ServerThread]:
    """A server whose record starts empty (for counting calls)."""
    srv = ServerThread(ScriptedInference()).start()
    yield srv
    srv.stop()

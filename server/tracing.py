"""OpenTelemetry spans of a call, from its front through queue, batch and backend.

Off by default. On with `--otlp-endpoint URL` (config `otlp_endpoint`) or the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: spans then go to
that OTLP/gRPC collector in batches (`configure`). Embedders and tests hand their own
span processor to `enable`. The opentelemetry packages are optional
(`pip install 'headrace[tracing]'`): without them the server runs untraced and says so.

While off, `TRACER` is None and every hook returns at once: no span, no context object.

The spans of one call (docs/serving.md#tracing):

    headrace.v1.Inference/Classify           SERVER; the caller's `traceparent` is its parent
      headrace.queue                         arrival -> taken into a batch (link: the batch)
      headrace.batch                         child of its first request (links: every request)
        headrace.backend.forward
    headrace.v1.Inference/GenerateStream     (KServe: inference.GRPCInferenceService/ModelInfer,
      headrace.queue                          HTTP: "POST /v1/completions")
      headrace.prefill                       the step that admitted the prompt -> first token
      headrace.token_stream                  first token -> end; one "chunk" event per chunk

Without a caller's own request id, a call's request id is its trace id (32 hex digits),
and the `rpc` log line carries `trace_id` and `span_id` whenever tracing is on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from headrace.server.logs import get_logger

if TYPE_CHECKING:
    from headrace.server.rpc import RpcInfo
    from headrace.server.types import TokenEvent
    from opentelemetry.context import Context

log = get_logger("headrace.tracing")

TRACER: Any = None  # the tracer while tracing is on; None: off
_provider: Any = None

# Which service each front's calls belong to (the span name is SERVICE/METHOD).
SERVICES = {"native": "headrace.v1.Inference", "kserve": "inference.GRPCInferenceService"}
# gRPC codes that are the server's fault (OpenTelemetry's semantic conventions for servers)
_SERVER_ERRORS = frozenset(
    ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")
)
_CARRIER_KEYS = ("traceparent", "tracestate", "baggage")
MISSING = "tracing needs the opentelemetry packages: pip install 'headrace[tracing]'"


def configure(endpoint: str | None) -> bool:
    """Turn tracing on when an OTLP endpoint is set (`endpoint`, else the OTEL_* environment).

    Returns whether tracing is on. Without the opentelemetry packages it logs a warning
    and stays off; an embedder's `enable` before is kept as it is."""
    if TRACER is not None:
        return True
    from_env = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not (endpoint or from_env):
        return False
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.info("tracing_off", reason="OTEL_SDK_DISABLED is true")
        return False
    try:
        # the exporter reads the environment itself (endpoint, headers, certificates)
        enable(endpoint=endpoint)
    except ImportError:
        log.warning("tracing_unavailable", reason=MISSING)
        return False
    log.info("tracing", otlp_endpoint=endpoint or from_env)
    return True


def enable(processor: Any = None, *, endpoint: str | None = None) -> None:
    """Trace every call into `processor` (an OpenTelemetry SpanProcessor), or by default in
    batches to the OTLP/gRPC exporter at `endpoint` (None: the OTEL_* environment's).

    The server keeps its own TracerProvider: the process-wide one is left to the embedder."""
    global TRACER, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    if processor is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    provider = TracerProvider(
        resource=Resource.create({} if named else {"service.name": "headrace"})
    )
    provider.add_span_processor(processor)
    disable()
    _provider = provider
    TRACER = provider.get_tracer("headrace.server")


def disable() -> None:
    """Tracing off; what was recorded is flushed to the exporter."""
    global TRACER, _provider
    provider, TRACER, _provider = _provider, None, None
    if provider is not None:
        provider.shutdown()


def current() -> Context | None:
    """The calling task's OpenTelemetry context (a parent for the engine's spans); None off."""
    if TRACER is None:
        return None
    from opentelemetry import context

    return context.get_current()


def _ns_ago(seconds: float) -> int:
    """Wall-clock nanoseconds `seconds` ago (spans are stamped in epoch time)."""
    return time.time_ns() - int(seconds * 1e9)


# -- the RPC span: every front, through server/rpc.py's Gate ---------------------------------


class RpcTrace:
    """The span of one call and the context token that made it current."""

    __slots__ = ("span", "span_id", "token", "trace_id")

    def __init__(self, span: Any, token: Any) -> None:
        ctx = span.get_span_context()
        self.span, self.token = span, token
        self.trace_id = format(ctx.trace_id, "032x")
        self.span_id = format(ctx.span_id, "016x")


def _carrier(metadata: Any) -> dict[str, str]:
    """gRPC metadata pairs or HTTP headers -> the W3C trace-context entries among them."""
    if metadata is None:
        return {}
    if hasattr(metadata, "get") and not isinstance(metadata, tuple | list):  # HTTP headers
        return {k: v for k in _CARRIER_KEYS if (v := metadata.get(k))}
    return {k: v for k, v in metadata if k in _CARRIER_KEYS and isinstance(v, str)}


def start_rpc(info: RpcInfo, metadata: Any, method: str = "") -> None:
    """Start `info`'s span (parent: the caller's `traceparent`) and make it current.

    A call without its own request id takes the trace id as its request id."""
    from opentelemetry import context, propagate
    from opentelemetry.trace import SpanKind, set_span_in_context

    parent = propagate.extract(_carrier(metadata))
    service = SERVICES.get(info.front)
    if service is None:  # HTTP: the route is the rpc
        name = f"{method or 'POST'} {info.rpc}"
        attributes: dict[str, Any] = {
            "http.request.method": method or "POST",
            "http.route": info.rpc,
        }
    else:
        name = f"{service}/{info.rpc}"
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": info.rpc}
    attributes["headrace.front"] = info.front
    span = TRACER.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
    trace = RpcTrace(span, context.attach(set_span_in_context(span, parent)))
    if not info.request_id:
        info.request_id = trace.trace_id
    info.trace = trace


def end_rpc(info: RpcInfo, fields: dict[str, Any]) -> None:
    """End `info`'s span with what its log line says; the log line gets its trace ids."""
    from opentelemetry import context
    from opentelemetry.trace import Status, StatusCode

    trace: RpcTrace = info.trace
    info.trace = None
    fields["trace_id"], fields["span_id"] = trace.trace_id, trace.span_id
    span = trace.span
    span.set_attributes({
        "headrace.request_id": info.request_id,
        "headrace.model": info.model,
        "headrace.model_version": info.model_version,
        "headrace.prompt_tokens": info.prompt_tokens,
        "headrace.completion_tokens": info.completion_tokens,
        "headrace.code": info.code.name,
    })  # fmt: skip
    http_status = info.extra.get("http_status")
    if info.front == "http" and isinstance(http_status, int):
        span.set_attribute("http.response.status_code", http_status)
        failed = http_status >= 500
    else:
        span.set_attribute("rpc.grpc.status_code", info.code.value[0])
        failed = info.code.name in _SERVER_ERRORS
    if failed:
        span.set_status(Status(StatusCode.ERROR, info.code.name))
    span.end()
    try:
        context.detach(trace.token)
    except Exception:  # ended in another context (a stream closed by the garbage collector)
        pass


# -- the encoder batcher ---------------------------------------------------------------------


class BatchTrace:
    """The span of one encoder batch, opened when the batch is taken from the queue."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def done(self, forward_s: float) -> None:
        """The backend call took `forward_s` seconds, just now: its span, then the batch's end."""
        from opentelemetry.trace import set_span_in_context

        end = time.time_ns()
        TRACER.start_span(
            "headrace.backend.forward",
            context=set_span_in_context(self.span),
            start_time=end - int(forward_s * 1e9),
        ).end(end_time=end)
        self.span.end(end_time=end)

    def failed(self, exc: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.record_exception(exc)
        self.span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        self.span.end()


def batch(model: str, parts: Sequence[tuple[Any, int, int]], rows: int) -> BatchTrace | None:
    """A batch of `rows` was taken: `parts` are the batcher's (request, first row, end row),
    each request with its `trace` (context at submit) and `arrival` (the loop's clock).
    -> a BatchTrace (None when off, or nothing in the batch is traced)."""
    if TRACER is None:
        return None
    from opentelemetry.trace import Link, get_current_span

    now = asyncio.get_running_loop().time()
    traced = [(req.trace, req.arrival) for req, _, _ in parts if req.trace is not None]
    if not traced:
        return None
    links = [Link(get_current_span(ctx).get_span_context()) for ctx, _ in traced]
    span = TRACER.start_span(
        "headrace.batch",
        context=traced[0][0],
        links=links,
        attributes={
            "headrace.model": model,
            "headrace.batch.rows": rows,
            "headrace.batch.requests": len(parts),
        },
    )
    to_batch = [Link(span.get_span_context())]
    end = time.time_ns()
    for ctx, arrival in traced:
        TRACER.start_span(
            "headrace.queue",
            context=ctx,
            links=to_batch,
            attributes={"headrace.model": model, "headrace.engine": "encoder"},
            start_time=end - int((now - arrival) * 1e9),
        ).end(end_time=end)
    return BatchTrace(span)


# -- the decoder: prefill and the token stream -----------------------------------------------


class GenerationTrace:
    """The spans of one generation, on the event loop: fed each event its consumer gets."""

    __slots__ = ("chunks", "ctx", "finished", "model", "span", "stream")

    def __init__(self, model: str, stream: Any, ctx: Any) -> None:
        self.model, self.stream, self.ctx = model, stream, ctx
        self.span: Any = None  # headrace.token_stream, from the first token on
        self.chunks = 0
        self.finished = False  # the last event (with its finish reason) went to the consumer

    def chunk(self, event: TokenEvent) -> None:
        if self.span is None:
            self._first_token()
        self.chunks += 1
        self.span.add_event(
            "chunk",
            {"headrace.tokens": len(event.token_ids), "headrace.chunk": self.chunks},
        )
        if event.finish_reason is not None:
            self.finished = True
            self.span.set_attributes({
                "headrace.finish_reason": event.finish_reason.name,
                "headrace.completion_tokens": event.completion_tokens,
                "headrace.chunks": self.chunks,
            })  # fmt: skip

    def _first_token(self) -> None:
        # stream times are perf_counter seconds: turned into epoch time against now
        stream, now = self.stream, time.perf_counter()
        first = stream.first_at if stream.first_at is not None else now
        admitted = stream.admitted_at if stream.admitted_at is not None else first
        model = {"headrace.model": self.model}
        TRACER.start_span(
            "headrace.queue",
            context=self.ctx,
            attributes={**model, "headrace.engine": "decoder"},
            start_time=_ns_ago(now - stream.arrival),
        ).end(end_time=_ns_ago(now - admitted))
        TRACER.start_span(
            "headrace.prefill",
            context=self.ctx,
            attributes={**model, "headrace.prompt_tokens": len(stream.params.prompt_ids)},
            start_time=_ns_ago(now - admitted),
        ).end(end_time=_ns_ago(now - first))
        self.span = TRACER.start_span(
            "headrace.token_stream",
            context=self.ctx,
            attributes=model,
            start_time=_ns_ago(now - first),
        )

    def end(self, exc: BaseException | None) -> None:
        """The generation ended: finished, failed (`exc`) or left by its consumer."""
        from opentelemetry.trace import Status, StatusCode

        if self.span is None:
            if exc is not None or self.stream.first_at is None:
                return  # refused or cancelled before its first token: the RPC span says so
            self._first_token()
        if exc is not None and isinstance(exc, Exception):
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        elif not self.finished:
            self.span.set_attribute("headrace.cancelled", True)
        self.span.end()


def generation(model: str, stream: Any) -> GenerationTrace | None:
    """The trace of a generation just submitted (None when off)."""
    if TRACER is None:
        return None
    return GenerationTrace(model, stream, current())

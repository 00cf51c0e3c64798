"""OpenTelemetry tracing over real sockets: the span tree of each kind of call, the caller's
trace continued, request ids that are trace ids, and nothing at all while tracing is off.

The server records into an InMemorySpanExporter handed to `tracing.enable` (what an
embedder would pass); the caller's spans come from a TracerProvider of the test's own.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from headrace.client import Client
from headrace.server import tracing
from opentelemetry import propagate
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.e2e.conftest import RunningServer, free_port
from tests.e2e.test_http_api import request

CALLER = TracerProvider().get_tracer("tests.caller")


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    tracing.enable(SimpleSpanProcessor(spans))
    yield spans
    tracing.disable()


@pytest.fixture(scope="module")
def traced(exporter: InMemorySpanExporter, tiny_models: Path) -> Iterator[RunningServer]:
    from tests.e2e.conftest import make_config

    running = RunningServer(make_config(tiny_models, http_port=free_port(), log_level="info"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(traced: RunningServer) -> Iterator[Client]:
    with Client(traced.address, timeout=60) as c:
        c.wait_ready(timeout=10)
        yield c


def wait_for_span(
    exporter: InMemorySpanExporter, match: Callable[[ReadableSpan], bool], timeout: float = 10
) -> ReadableSpan:
    """The first finished span `match` accepts (a stream's RPC span ends after its last chunk)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for span in exporter.get_finished_spans():
            if match(span):
                return span
        time.sleep(0.02)
    raise AssertionError("no such span")


def tree(exporter: InMemorySpanExporter, root: ReadableSpan) -> dict[str, list[ReadableSpan]]:
    """Name -> spans whose parent is `root`."""
    out: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        if span.parent is not None and span.parent.span_id == root.context.span_id:
            out.setdefault(span.name, []).append(span)
    return out


def rpc_lines(err: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "rpc"]


def wait_for_line(
    capfd: pytest.CaptureFixture[str], match: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """The first `rpc` log line `match` accepts (lines go out on the loop's next turn)."""
    end, seen = time.monotonic() + timeout, []
    while time.monotonic() < end:
        seen += rpc_lines(capfd.readouterr().err)
        for line in seen:
            if match(line):
                return line
        time.sleep(0.02)
    raise AssertionError(f"no such rpc line in {seen}")


def hex_trace(span: Any) -> str:
    return format(span.get_span_context().trace_id, "032x")


def test_classify_span_tree(
    client: Client, exporter: InMemorySpanExporter, capfd: pytest.CaptureFixture[str]
) -> None:
    with CALLER.start_as_current_span("caller") as caller:
        result = client.classify(["a fine day", "awful"])
    trace_id = hex_trace(caller)
    assert result.request_id == trace_id  # no id of the caller's own: the trace id

    rpc = wait_for_span(exporter, lambda s: s.name == "headrace.v1.Inference/Classify")
    assert rpc.kind is SpanKind.SERVER
    assert rpc.context.trace_id == caller.get_span_context().trace_id
    assert rpc.parent is not None and rpc.parent.span_id == caller.get_span_context().span_id
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.system"] == "grpc" and rpc.attributes["rpc.method"] == "Classify"
    assert rpc.attributes["headrace.model"] == "tiny-classifier"
    assert rpc.attributes["headrace.request_id"] == trace_id
    assert rpc.attributes["rpc.grpc.status_code"] == 0

    children = tree(exporter, rpc)
    [queue] = children["headrace.queue"]
    [batch] = children["headrace.batch"]  # the batch is the child of its first request
    assert batch.attributes is not None and batch.attributes["headrace.batch.rows"] == 2
    assert rpc.context.span_id in {link.context.span_id for link in batch.links}
    assert [link.context.span_id for link in queue.links] == [batch.context.span_id]
    assert queue.start_time is not None and rpc.start_time is not None
    assert queue.end_time is not None and batch.start_time is not None
    assert rpc.start_time <= queue.start_time <= queue.end_time
    [forward] = tree(exporter, batch)["headrace.backend.forward"]
    assert forward.context.trace_id == rpc.context.trace_id

    line = wait_for_line(capfd, lambda x: x["rpc"] == "Classify" and x["request_id"] == trace_id)
    assert line["trace_id"] == trace_id and line["span_id"] == format(rpc.context.span_id, "016x")


def test_batch_links_every_request_in_it(
    traced: RunningServer, exporter: InMemorySpanExporter
) -> None:
    """Requests that share a batch: one batch span, linked to each request's span."""
    import asyncio

    from headrace.client import AsyncClient

    async def calls() -> list[str]:
        async with AsyncClient(traced.address, timeout=60) as c:
            spans = [CALLER.start_span(f"caller-{i}") for i in range(6)]

            async def one(span: Any) -> str:
                from opentelemetry.trace import use_span

                with use_span(span, end_on_exit=True):
                    return (await c.classify("shared batch", request_id=None)).request_id

            return await asyncio.gather(*(one(s) for s in spans))

    ids = set(asyncio.run(calls()))
    assert len(ids) == 6
    rpcs = {}
    for rid in ids:
        span = wait_for_span(
            exporter,
            lambda s, rid=rid: (
                s.name.endswith("/Classify") and format(s.context.trace_id, "032x") == rid
            ),
        )
        rpcs[span.context.span_id] = span
    batches = [s for s in exporter.get_finished_spans() if s.name == "headrace.batch"]
    linked = {link.context.span_id for b in batches for link in b.links}
    assert set(rpcs) <= linked  # every request is linked from the batch it ran in
    for rpc in rpcs.values():  # and its queue span links to that batch
        [queue] = tree(exporter, rpc)["headrace.queue"]
        [to_batch] = queue.links
        [mine] = [b for b in batches if b.context.span_id == to_batch.context.span_id]
        assert rpc.context.span_id in {link.context.span_id for link in mine.links}


def test_generate_stream_span_tree(
    client: Client, exporter: InMemorySpanExporter, capfd: pytest.CaptureFixture[str]
) -> None:
    with CALLER.start_as_current_span("caller") as caller:
        chunks = list(client.stream("the service answered", max_new_tokens=6))
    trace_id = hex_trace(caller)
    rpc = wait_for_span(
        exporter,
        lambda s: (
            s.name == "headrace.v1.Inference/GenerateStream"
            and format(s.context.trace_id, "032x") == trace_id
        ),
    )
    assert rpc.parent is not None and rpc.parent.span_id == caller.get_span_context().span_id
    children = tree(exporter, rpc)
    [queue] = children["headrace.queue"]
    [prefill] = children["headrace.prefill"]
    [stream] = children["headrace.token_stream"]
    assert queue.end_time is not None and prefill.start_time is not None
    assert prefill.end_time is not None and stream.start_time is not None
    assert (
        queue.end_time <= prefill.start_time + 1000 and prefill.end_time <= stream.start_time + 1000
    )
    events = [e for e in stream.events if e.name == "chunk"]
    assert len(events) == len(chunks)  # one event per chunk sent, not a span per token
    assert sum(int(e.attributes["headrace.tokens"]) for e in events if e.attributes) == sum(
        len(c.token_ids) for c in chunks
    )
    assert stream.attributes is not None
    assert stream.attributes["headrace.finish_reason"] == chunks[-1].finish_reason.name
    assert "headrace.cancelled" not in stream.attributes
    line = wait_for_line(capfd, lambda x: x["request_id"] == trace_id)
    assert line["rpc"] == "GenerateStream" and line["trace_id"] == trace_id


def test_http_call_continues_the_callers_trace(
    traced: RunningServer, exporter: InMemorySpanExporter, capfd: pytest.CaptureFixture[str]
) -> None:
    headers: dict[str, str] = {"content-type": "application/json"}
    with CALLER.start_as_current_span("caller") as caller:
        propagate.inject(headers)  # what an instrumented HTTP client sends
    assert "traceparent" in headers
    status, response_headers, data = request(
        traced, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 3}, headers
    )
    assert status == 200
    trace_id = hex_trace(caller)
    assert response_headers["x-request-id"] == trace_id
    assert json.loads(data)["id"] == f"cmpl-{trace_id}"
    rpc = wait_for_span(exporter, lambda s: s.name == "POST /v1/completions")
    assert rpc.kind is SpanKind.SERVER
    assert rpc.parent is not None and rpc.parent.span_id == caller.get_span_context().span_id
    assert rpc.attributes is not None and rpc.attributes["http.response.status_code"] == 200
    assert {"headrace.queue", "headrace.prefill", "headrace.token_stream"} <= set(
        tree(exporter, rpc)
    )
    line = wait_for_line(capfd, lambda x: x["request_id"] == trace_id)
    assert line["front"] == "http" and line["trace_id"] == trace_id


def test_kserve_model_infer_continues_the_callers_trace(
    traced: RunningServer, exporter: InMemorySpanExporter
) -> None:
    import grpc
    from headrace.server.kserve.pb import grpc_service_pb2_grpc as kserve_grpc

    from tests.e2e.test_kserve import classify

    metadata: dict[str, str] = {}
    with CALLER.start_as_current_span("caller") as caller:
        propagate.inject(metadata)  # what an instrumented gRPC client sends
    with grpc.insecure_channel(traced.address) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(
            classify("tiny-classifier", ["fine"]), metadata=tuple(metadata.items()), timeout=30
        )
    assert response.outputs
    rpc = wait_for_span(
        exporter,
        lambda s: (
            s.name == "inference.GRPCInferenceService/ModelInfer"
            and format(s.context.trace_id, "032x") == hex_trace(caller)
        ),
    )
    assert rpc.parent is not None and rpc.parent.span_id == caller.get_span_context().span_id
    assert {"headrace.queue", "headrace.batch"} <= set(tree(exporter, rpc))


def test_own_request_id_kept_beside_the_trace_id(
    client: Client, exporter: InMemorySpanExporter, capfd: pytest.CaptureFixture[str]
) -> None:
    with CALLER.start_as_current_span("caller") as caller:
        assert client.classify("fine", request_id="mine-1").request_id == "mine-1"
    line = wait_for_line(capfd, lambda x: x["request_id"] == "mine-1")
    assert line["trace_id"] == hex_trace(caller)


def test_tracing_off_creates_no_spans(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Off (the default): no span object is made, whatever the caller sends."""
    from opentelemetry.sdk import trace as sdk_trace

    from tests.e2e.conftest import make_config

    tracing.disable()  # the other tests' exporter: off, as a server starts by default
    started: list[str] = []
    real = sdk_trace.Tracer.start_span

    def counting(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        started.append(name)
        return real(self, name, *args, **kwargs)

    with CALLER.start_as_current_span("caller") as caller:
        monkeypatch.setattr(sdk_trace.Tracer, "start_span", counting)  # every SDK span
        running = RunningServer(make_config(tiny_models, http_port=free_port(), log_level="info"))
        try:
            with Client(running.address, timeout=60) as c:
                result = c.classify("fine")
                chunks = list(c.stream("the service answered", max_new_tokens=4))
            headers: dict[str, str] = {}
            propagate.inject(headers)
            status, _, _ = request(running, "POST", "/v1/classify", {"texts": "fine"}, headers)
        finally:
            running.stop()
    assert status == 200 and chunks
    assert started == []
    assert result.request_id != hex_trace(caller)
    lines = rpc_lines(capfd.readouterr().err)  # the server stopped: every line is out
    assert len(lines) == 3 and not any("trace_id" in x for x in lines)


# -- `headrace serve` in a process of its own ------------------------------------------------

BLOCK_OPENTELEMETRY = """
import importlib.abc, sys
class _NoOpenTelemetry(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoOpenTelemetry())
"""


def _serve(models: Path, tmp_path: Path, *args: str, prelude: str = "") -> tuple[Any, int]:
    """`headrace serve` in a subprocess (after `prelude`, Python run first) -> (process, port)."""
    import subprocess
    import sys

    from tests.e2e.test_cli import _wait_port

    port_file = tmp_path / "port"
    code = (
        prelude + "import sys\nfrom headrace.server.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--models", str(models), "--port", "0",
         "--port-file", str(port_file), "--poll-interval", "0", "--profile", "cpu", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "50"},
    )  # fmt: skip
    return proc, _wait_port(port_file, proc)


def _stop(proc: Any) -> list[dict[str, Any]]:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]


@pytest.mark.timeout(120)
def test_serve_exports_to_an_otlp_collector(tiny_models: Path, tmp_path: Path) -> None:
    """--otlp-endpoint: the spans reach a real OTLP/gRPC collector, under the caller's span."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

    received: list[Any] = []  # opentelemetry.proto.trace.v1 Span messages

    class Collector(otlp_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            received.extend(
                span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans
            )
            return otlp.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(2))
    otlp_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    collector_port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    proc, port = _serve(
        tiny_models, tmp_path, "--otlp-endpoint", f"http://127.0.0.1:{collector_port}"
    )
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            with CALLER.start_as_current_span("caller") as caller:
                result = c.classify("fine")
        caller_ctx = caller.get_span_context()
        end = time.monotonic() + 20
        while time.monotonic() < end and not any(
            s.name == "headrace.v1.Inference/Classify" for s in received
        ):
            time.sleep(0.05)
        [rpc] = [s for s in received if s.name == "headrace.v1.Inference/Classify"]
        assert rpc.trace_id.hex() == format(caller_ctx.trace_id, "032x") == result.request_id
        assert rpc.parent_span_id.hex() == format(caller_ctx.span_id, "016x")
    finally:
        events = _stop(proc)
        collector.stop(0)
    assert any(e["event"] == "tracing" for e in events)
    assert {"headrace.queue", "headrace.batch", "headrace.backend.forward"} <= {
        s.name for s in received
    }


@pytest.mark.timeout(120)
def test_without_the_packages_the_server_runs_untraced(tiny_models: Path, tmp_path: Path) -> None:
    """opentelemetry missing (an edge install): a warning, and the server serves untraced."""
    proc, port = _serve(
        tiny_models, tmp_path, "--otlp-endpoint", "http://127.0.0.1:9", prelude=BLOCK_OPENTELEMETRY
    )
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            with CALLER.start_as_current_span("caller"):
                assert c.classify("fine").results
    finally:
        events = _stop(proc)
    [warning] = [e for e in events if e["event"] == "tracing_unavailable"]
    assert "headrace[tracing]" in warning["reason"]
    [line] = [e for e in events if e["event"] == "rpc"]
    assert line["code"] == "OK" and "trace_id" not in line


def test_the_sdk_without_opentelemetry_sends_no_trace_context() -> None:
    import subprocess
    import sys

    code = BLOCK_OPENTELEMETRY + (
        "from headrace.client._tracing import with_trace_context\n"
        "pairs = (('x-request-id', 'r'),)\n"
        "assert with_trace_context(pairs) is pairs\n"
        "import headrace.client, sys\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

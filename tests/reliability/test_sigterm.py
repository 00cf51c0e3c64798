"""SIGTERM to `headrace serve` with calls in flight on every front: gRPC generation
streams, OpenAI SSE streams, a KServe stream and unary calls. Within the grace period
each runs to its end; past a short one each ends with a clear status; none hangs, and
the process exits 0.

tests/e2e/test_cli.py drains one gRPC stream and one SSE stream; here many at once."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from headrace.server.app import QUIET_S
from headrace.server.kserve.pb import grpc_service_pb2 as kpb
from headrace.server.kserve.pb import grpc_service_pb2_grpc as kpb_grpc
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.reliability.conftest import free_port

HEADRACE = [sys.executable, "-m", "headrace.server"]
GRPC_STREAMS, SSE_STREAMS, UNARY = 5, 2, 2  # with one KServe stream: 10 calls, 8 KV slots


class Served:
    def __init__(self, proc: subprocess.Popen[str], port: int, http_port: int) -> None:
        self.proc, self.address = proc, f"127.0.0.1:{port}"
        self.http = f"http://127.0.0.1:{http_port}"


@pytest.fixture()
def serve(long_models: Path, tmp_path: Path) -> Iterator[Callable[[float], Served]]:
    procs: list[subprocess.Popen[str]] = []

    def start(grace_s: float) -> Served:
        port_file, http_port = tmp_path / "port", free_port()
        proc = subprocess.Popen(
            [*HEADRACE, "serve", "--models", str(long_models), "--port", "0", "--port-file",
             str(port_file), "--http-port", str(http_port), "--poll-interval", "0",
             "--grace-period", str(grace_s)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(proc)
        end = time.monotonic() + 90
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < end, "server did not start"
            time.sleep(0.05)
        return Served(proc, int(port_file.read_text()), http_port)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _grpc_stream(address: str, tokens: int, started: threading.Event) -> str:
    with grpc.insecure_channel(address) as channel:
        request = pb.GenerateRequest(
            model="long-generator", prompt="the", max_new_tokens=tokens,
            sampling=pb.SamplingParams(ignore_eos=True),
        )  # fmt: skip
        call = pb_grpc.InferenceStub(channel).GenerateStream(request, timeout=60)
        chunks = []
        try:
            for chunk in call:
                chunks.append(chunk)
                started.set()
        except grpc.RpcError as err:
            started.set()
            return err.code().name  # type: ignore[attr-defined]
        assert chunks[-1].usage.completion_tokens == tokens
        return "OK"


def _unary(address: str, tokens: int, started: threading.Event) -> str:
    with grpc.insecure_channel(address) as channel:
        request = pb.GenerateRequest(
            model="long-generator", prompt="the", max_new_tokens=tokens,
            sampling=pb.SamplingParams(ignore_eos=True),
        )  # fmt: skip
        future = pb_grpc.InferenceStub(channel).Generate.future(request, timeout=60)
        time.sleep(0.2)  # sent, and in the engine by now
        started.set()
        try:
            assert future.result().usage.completion_tokens == tokens
        except grpc.RpcError as err:
            return err.code().name  # type: ignore[attr-defined]
        return "OK"


def _kserve_stream(address: str, tokens: int, started: threading.Event) -> str:
    request = kpb.ModelInferRequest(model_name="long-generator")
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"the")
    sampling = request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    sampling.contents.bytes_contents.append(
        json.dumps({"max_tokens": tokens, "ignore_eos": True}).encode()
    )
    stream = request.inputs.add(name="stream", datatype="BOOL", shape=[1])
    stream.contents.bool_contents.append(True)
    with grpc.insecure_channel(address) as channel:
        answers = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([request]), timeout=60
        )
        count = 0
        try:
            for answer in answers:
                assert not answer.error_message, answer.error_message
                count += 1
                started.set()
                params = answer.infer_response.parameters
                if "completion_tokens" in params:
                    assert params["completion_tokens"].int64_param == tokens
                    return "OK"
        except grpc.RpcError as err:
            started.set()
            return err.code().name  # type: ignore[attr-defined]
    return "OK" if count else "EMPTY"


def _sse(base: str, tokens: int, started: threading.Event) -> str:
    body = {"model": "long-generator", "prompt": "the", "max_tokens": tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as stream:
            stream.readline()
            started.set()
            rest = stream.read().decode()
    except (OSError, http.client.HTTPException) as exc:  # the connection closed under the read
        started.set()
        return type(exc).__name__
    if rest.rstrip().endswith("data: [DONE]") and f'"completion_tokens":{tokens}' in rest:
        return "OK"
    if '"error"' not in rest:
        return "CUT"
    # the server's last event when the drain's grace ran out under the stream: clear
    return "SHUTTING_DOWN" if "shutting down" in rest else "ERROR_EVENT"


def _run_then_sigterm(served: Served, tokens: int) -> list[str]:
    calls: list[Callable[[threading.Event], str]] = []
    calls += [lambda e: _grpc_stream(served.address, tokens, e)] * GRPC_STREAMS
    calls += [lambda e: _sse(served.http, tokens, e)] * SSE_STREAMS
    calls += [lambda e: _unary(served.address, tokens, e)] * UNARY
    calls += [lambda e: _kserve_stream(served.address, tokens, e)]
    events = [threading.Event() for _ in calls]
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(fn, e) for fn, e in zip(calls, events, strict=True)]
        for e in events:
            assert e.wait(60), "a call did not start"
        os.kill(served.proc.pid, signal.SIGTERM)
        return [f.result(timeout=90) for f in futures]  # none hangs


def test_sigterm_lets_every_call_in_flight_finish(serve) -> None:
    served = serve(30.0)
    outcomes = _run_then_sigterm(served, tokens=200)
    assert outcomes == ["OK"] * len(outcomes), outcomes
    # Calls that come in within QUIET_S of the last one are still served (clients are
    # moving away; server/app.py); past that window a new call is not taken.
    time.sleep(2 * QUIET_S)
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(texts=["late"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert served.proc.wait(30) == 0


@pytest.mark.slow
def test_sigterm_past_a_short_grace_ends_every_call_clearly(serve) -> None:
    served = serve(0.3)
    t0 = time.monotonic()
    outcomes = _run_then_sigterm(served, tokens=400)
    clear = {"OK", "CANCELLED", "UNAVAILABLE", "CUT", "SHUTTING_DOWN", "RemoteDisconnected",
             "IncompleteRead"}  # fmt: skip
    assert set(outcomes) <= clear, outcomes
    rc = served.proc.wait(30)
    assert rc == 0, served.proc.stderr.read()[-4000:] if served.proc.stderr else rc
    assert time.monotonic() - t0 < 30

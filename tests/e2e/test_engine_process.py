"""`headrace serve --workers 2 --engine-process`: two front ends and one engine process, in
real processes over real sockets: every RPC through the engine, one batch for both front
ends, cancellation freeing the engine's slot, a killed engine (UNAVAILABLE, then served
again), a killed front end (the other unaffected), the drain on SIGTERM."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headrace.client import Client, RetryPolicy
from headrace.server.kserve.pb import grpc_service_pb2 as kpb
from headrace.server.kserve.pb import grpc_service_pb2_grpc as kgrpc
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.e2e.conftest import scrape
from tests.e2e.test_workers import GEN, Workers, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING


class Engine(Workers):
    """Workers with `--engine-process`: the pids of the engine are in its own log lines."""

    def __init__(self, models: Path, tmp: Path, *extra: str) -> None:
        super().__init__(models, tmp, "--engine-process", *extra)

    def engine_pids(self) -> list[int]:
        return [line["engine_pid"] for line in self.events("engine_started")]


@pytest.fixture(scope="module")
def engine(long_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    running = Engine(long_models, tmp_path_factory.mktemp("engine"))
    yield running
    running.stop()


def G(**fields: Any) -> pb.GenerateRequest:
    fields.setdefault("model", GEN)
    return pb.GenerateRequest(**fields)


def pid_of(engine: Engine, request_id: str) -> int:
    wait_for(lambda: any(ln.get("request_id") == request_id for ln in engine.events("rpc")))
    return int(next(ln["pid"] for ln in engine.events("rpc") if ln.get("request_id") == request_id))


def test_only_the_engine_loads_models(engine: Engine) -> None:
    loaded = {line["pid"] for line in engine.events("model_version_ready")}
    assert loaded == set(engine.engine_pids()[:1]), loaded
    assert not loaded & engine.worker_pids()


def test_every_rpc_through_the_engine(engine: Engine) -> None:
    with grpc.insecure_channel(engine.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert set(models) == {"tiny-classifier", GEN}
        assert models["tiny-classifier"].backend == "torch"
        got = stub.Classify(pb.ClassifyRequest(texts=["good", "bad"], top_k=2))
        assert len(got.results) == 2 and all(len(r.labels) == 2 for r in got.results)
        assert got.usage.prompt_tokens > 0
        answers = list(stub.ClassifyStream(iter([pb.ClassifyRequest(texts=["a"])] * 3)))
        assert len(answers) == 3
        whole = stub.Generate(G(prompt="the", max_new_tokens=6, sampling=pb.SamplingParams(
            ignore_eos=True)))  # fmt: skip
        assert len(whole.token_ids) == 6 and whole.finish_reason == pb.LENGTH
        chunks = list(stub.GenerateStream(G(prompt="the", max_new_tokens=6, sampling=pb.SamplingParams(
            ignore_eos=True))))  # fmt: skip
        assert "".join(c.text for c in chunks) == whole.text  # greedy: the same tokens
        assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
        assert chunks[-1].usage.completion_tokens == 6
        with pytest.raises(grpc.RpcError) as err:  # checked in the front end
            stub.Generate(G(prompt="", max_new_tokens=6))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(model="nope", texts=["a"]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "tiny-classifier", GEN):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == SERVING
        kserve = kgrpc.GRPCInferenceServiceStub(channel)
        assert kserve.ModelReady(kpb.ModelReadyRequest(name="tiny-classifier")).ready
        text = kpb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1],
            contents=kpb.InferTensorContents(bytes_contents=[b"good"]),
        )  # fmt: skip
        out = kserve.ModelInfer(kpb.ModelInferRequest(model_name="tiny-classifier", inputs=[text]))
        assert out.model_name == "tiny-classifier" and out.outputs
    base = f"http://127.0.0.1:{engine.http_port}"
    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
        assert {m["id"] for m in json.loads(r.read())["data"]} == {"tiny-classifier", GEN}
    body = json.dumps({"model": GEN, "prompt": "the", "max_tokens": 4}).encode()
    request = urllib.request.Request(
        f"{base}/v1/completions", body, {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] <= 4
    body = json.dumps({"texts": ["good", "bad"]}).encode()
    request = urllib.request.Request(
        f"{base}/v1/classify", body, {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        assert len(json.loads(r.read())["results"]) == 2


def test_stream_interval_rules_through_the_engine(engine: Engine) -> None:
    """The engine applies stream_interval (tokens) and stream_interval_ms in its delivery
    (GeneratorModel.forward); the front end relays, coalescing only when it is behind."""
    sampling = pb.SamplingParams(ignore_eos=True)
    with grpc.insecure_channel(engine.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        one = list(stub.GenerateStream(G(prompt="the", max_new_tokens=24, sampling=sampling)))
        fives = list(stub.GenerateStream(G(prompt="the", max_new_tokens=24, sampling=sampling,
                                           stream_interval=5)))  # fmt: skip
        assert [t for c in fives for t in c.token_ids] == [t for c in one for t in c.token_ids]
        assert len(fives) <= 5 and all(len(c.token_ids) >= 5 for c in fives[:-1])
        received = []
        for chunk in stub.GenerateStream(G(prompt="the", max_new_tokens=400, sampling=sampling,
                                           stream_interval_ms=60)):  # fmt: skip
            received.append((time.perf_counter(), len(chunk.token_ids)))
    assert sum(n for _, n in received) == 400
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(received[:-1])]  # the last: at once
    # 60 ms apart when they left the engine; a loaded box's delivery jitter narrows a gap
    assert min(gaps) >= 0.03 and sum(gaps) / len(gaps) >= 0.05, gaps
    assert len(received) >= 3 and all(n > 1 for _, n in received[1:-1])  # held, not one each


def test_both_front_ends_serve(engine: Engine) -> None:
    for i in range(24):  # one connection each: the kernel picks a front end per connection
        with grpc.insecure_channel(engine.address) as channel:
            pb_grpc.InferenceStub(channel).Classify(
                pb.ClassifyRequest(texts=["spread"], request_id=f"espread-{i}")
            )
    pids = {pid_of(engine, f"espread-{i}") for i in range(24)}
    assert pids == engine.worker_pids() and len(pids) == 2, pids


def test_cancel_frees_the_slot_in_the_engine(engine: Engine) -> None:
    url = f"http://127.0.0.1:{engine.metrics_port}/metrics"
    tokens = {"model": GEN}
    with grpc.insecure_channel(engine.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.GenerateStream(
            G(prompt="the", max_new_tokens=400, request_id="ecancel-1",
              sampling=pb.SamplingParams(ignore_eos=True))
        )  # fmt: skip
        next(call)
        wait_for(lambda: scrape(url, "headrace_active_slots", tokens) == 1)  # the engine's
        call.cancel()
        wait_for(lambda: scrape(url, "headrace_active_slots", tokens) == 0, timeout=15)
        made = scrape(url, "headrace_generation_tokens_total", tokens)
        time.sleep(0.5)
        assert scrape(url, "headrace_generation_tokens_total", tokens) == made  # decoding stopped
        line = next(ln for ln in engine.events("rpc") if ln.get("request_id") == "ecancel-1")
        assert line["code"] == "CANCELLED" and line["completion_tokens"] < 300, line
        assert stub.Generate(G(prompt="the", max_new_tokens=3)).usage.completion_tokens <= 3


def kill_engine_under_a_stream(running: Engine, stub: pb_grpc.InferenceStub) -> int:
    """SIGKILL the engine while a stream of GEN runs: the stream ends UNAVAILABLE."""
    first = running.engine_pids()[-1]
    call = stub.GenerateStream(
        G(prompt="the", max_new_tokens=400, sampling=pb.SamplingParams(ignore_eos=True))
    )
    next(call)
    os.kill(first, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    return first


def test_killed_engine_fails_calls_unavailable_then_serves_again(engine: Engine) -> None:
    with grpc.insecure_channel(engine.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        first = kill_engine_under_a_stream(engine, stub)
        with pytest.raises(grpc.RpcError) as err:  # while it restarts: retryable
            stub.Classify(pb.ClassifyRequest(texts=["meanwhile"]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        wait_for(lambda: len(engine.engine_pids()) == 2, timeout=30)
        assert engine.events("engine_died")[-1]["engine_pid"] == first
        patient = RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=5.0)
        with Client(engine.address, timeout=60, retry=patient) as client:
            end = time.monotonic() + 60
            while True:  # the new engine loads the models (seconds)
                try:
                    assert len(client.classify(["back"])) == 1
                    break
                except Exception:
                    assert time.monotonic() < end
                    time.sleep(0.2)
            assert client.generate("the", model=GEN, max_new_tokens=3).usage.completion_tokens <= 3
    assert engine.worker_pids() == {ln["worker_pid"] for ln in engine.events("worker_started")}


def test_killed_front_end_leaves_the_other_unaffected(engine: Engine) -> None:
    channels, pids = [], []
    for i in range(32):  # a connection on each front end (own subchannels: own connections)
        channel = grpc.insecure_channel(engine.address, [("grpc.use_local_subchannel_pool", 1)])
        pb_grpc.InferenceStub(channel).Classify(
            pb.ClassifyRequest(texts=["which"], request_id=f"efront-{i}")
        )
        channels.append(channel)
        pids.append(pid_of(engine, f"efront-{i}"))
        if len(set(pids)) == 2:
            break
    assert len(set(pids)) == 2
    victim, survivor = pids[0], pids[-1]
    stub = pb_grpc.InferenceStub(channels[-1])
    call = stub.GenerateStream(
        G(prompt="the", max_new_tokens=120, sampling=pb.SamplingParams(ignore_eos=True))
    )
    first = next(call)
    os.kill(victim, signal.SIGKILL)
    rest = list(call)  # the survivor's stream and engine run on
    assert sum(len(c.token_ids) for c in [first, *rest]) == 120
    for _ in range(5):
        assert len(stub.Classify(pb.ClassifyRequest(texts=["still"])).results) == 1
    wait_for(lambda: victim not in engine.worker_pids(), timeout=30)
    wait_for(lambda: len(engine.worker_pids()) == 2, timeout=30)  # replaced
    assert survivor in engine.worker_pids()
    for channel in channels:
        channel.close()


def test_sigterm_drains_front_ends_then_the_engine(long_models: Path, tmp_path: Path) -> None:
    running = Engine(long_models, tmp_path)
    pids = running.worker_pids() | set(running.engine_pids())
    channels = [grpc.insecure_channel(running.address) for _ in range(6)]
    calls = [
        pb_grpc.InferenceStub(ch).GenerateStream(
            G(prompt="the", max_new_tokens=200, sampling=pb.SamplingParams(ignore_eos=True))
        )
        for ch in channels
    ]
    firsts = [next(call) for call in calls]  # every stream is running
    running.proc.send_signal(signal.SIGTERM)
    results = [[first, *call] for first, call in zip(firsts, calls, strict=True)]
    assert all(r[-1].finish_reason == pb.LENGTH for r in results)  # each finished its work
    assert all(sum(len(c.token_ids) for c in r) == 200 for r in results)
    assert running.proc.wait(60) == 0
    for ch in channels:
        ch.close()
    running.stop()
    stopped = [ln for ln in running.events("stopped") if ln.get("worker") != "supervisor"]
    assert {ln["pid"] for ln in stopped} == pids
    assert stopped[-1]["worker"] == "engine"  # the engine stops last
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_onnx_runtime_behind_the_engine(onnx_models: Path, tmp_path: Path) -> None:
    running = Engine(onnx_models, tmp_path, "--profile", "edge")
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            backends = {m.name: m.backend for m in stub.ListModels(pb.ListModelsRequest()).models}
            assert set(backends.values()) == {"onnxruntime"}, backends
            got = stub.Classify(pb.ClassifyRequest(model="tiny-classifier", texts=["good"]))
            assert len(got.results) == 1
            out = stub.Generate(pb.GenerateRequest(model="tiny-generator", prompt="the",
                                                   max_new_tokens=4))  # fmt: skip
            assert 1 <= out.usage.completion_tokens <= 4
    finally:
        assert running.stop() == 0


def test_hot_reload_in_the_engine_reaches_both_front_ends(
    tiny_models: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny-classifier", repo / "tiny-classifier")
    running = Engine(repo, tmp_path, "--poll-interval", "0.3")
    try:

        def versions() -> set[tuple[str, ...]]:
            seen = set()
            for _ in range(16):  # connections on both front ends
                with grpc.insecure_channel(running.address) as channel:
                    models = pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest())
                    seen.add(tuple(v for m in models.models for v in m.versions))
            return seen

        assert versions() == {("1",)}
        shutil.copytree(repo / "tiny-classifier" / "1", repo / "tiny-classifier" / "2")
        wait_for(lambda: versions() == {("2", "1")}, timeout=60)
        with grpc.insecure_channel(running.address) as channel:
            got = pb_grpc.InferenceStub(channel).Classify(pb.ClassifyRequest(texts=["new"]))
            assert got.model_version == "2"
        loaded = {ln["pid"] for ln in running.events("model_version_ready")}
        assert loaded == set(running.engine_pids())  # loaded once, by the engine
    finally:
        assert running.stop() == 0

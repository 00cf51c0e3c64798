"""The served API over real sockets: every RPC, errors, cancellation, health, reflection."""

from __future__ import annotations

import concurrent.futures
import re
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.e2e.conftest import RunningServer, add_variant, bad_request_field


@pytest.fixture()
def stub(server: RunningServer):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.InferenceStub(channel)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def error_of(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


# -- the five RPCs -------------------------------------------------------------------------------


def test_list_models(stub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"tiny-classifier", "tiny-generator"}
    cls, gen = models["tiny-classifier"], models["tiny-generator"]
    assert cls.task == pb.TASK_CLASSIFY and gen.task == pb.TASK_GENERATE
    assert list(cls.labels) == ["negative", "neutral", "positive"]
    assert list(cls.versions) == ["1"] and cls.is_default and gen.is_default
    assert (cls.backend, cls.precision, cls.device, cls.profile) == ("torch", "fp32", "cpu", "cpu")
    assert cls.limits.max_texts == 32 and cls.limits.max_input_tokens == 64
    assert gen.limits.max_new_tokens == 64 and gen.limits.max_batch == 8
    only = stub.ListModels(pb.ListModelsRequest(task=pb.TASK_GENERATE)).models
    assert [m.name for m in only] == ["tiny-generator"]


def test_classify(stub) -> None:
    texts = ["I love this, it is great", "this is terrible", "the weather is fine"]
    resp = stub.Classify(pb.ClassifyRequest(texts=texts, request_id="abc-1"))
    assert (resp.model, resp.model_version, resp.request_id) == ("tiny-classifier", "1", "abc-1")
    assert len(resp.results) == 3
    for result in resp.results:
        scores = [label.score for label in result.labels]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert result.input_tokens > 2 and not result.truncated
    assert resp.usage.prompt_tokens == sum(r.input_tokens for r in resp.results)
    top = stub.Classify(pb.ClassifyRequest(model="tiny-classifier", texts=texts, top_k=1))
    assert [len(r.labels) for r in top.results] == [1, 1, 1]
    assert [r.labels[0].name for r in top.results] == [r.labels[0].name for r in resp.results]


def test_classify_truncates_long_text(stub) -> None:
    resp = stub.Classify(pb.ClassifyRequest(texts=["the service answered " * 60]))
    assert resp.results[0].truncated and resp.results[0].input_tokens == 64


def test_request_id_from_metadata_or_generated(stub) -> None:
    resp, call = stub.Classify.with_call(
        pb.ClassifyRequest(texts=["hello"]), metadata=(("x-request-id", "from-meta"),)
    )
    assert resp.request_id == "from-meta"
    # unary calls: in the trailers (sent with the answer); streams: initial metadata
    assert ("x-request-id", "from-meta") in tuple(call.trailing_metadata())
    resp, call = stub.Classify.with_call(pb.ClassifyRequest(texts=["hello"]))
    assert re.fullmatch(r"[0-9a-f]{32}", resp.request_id)
    assert ("x-request-id", resp.request_id) in tuple(call.trailing_metadata())
    other, _ = stub.Classify.with_call(pb.ClassifyRequest(texts=["hello"]))
    assert other.request_id != resp.request_id
    chunks = stub.GenerateStream(pb.GenerateRequest(prompt="a", max_new_tokens=2))
    assert ("x-request-id", next(chunks).request_id) in tuple(chunks.initial_metadata())
    chunks.cancel()


def test_classify_stream_keeps_order_and_ids(stub) -> None:
    # request i carries i % 4 + 1 texts, so a reordered answer shows in the counts
    requests = [
        pb.ClassifyRequest(texts=["great day"] * (i % 4 + 1), request_id=f"r{i}") for i in range(24)
    ]
    responses = list(stub.ClassifyStream(iter(requests)))
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(24)]
    assert [len(r.results) for r in responses] == [i % 4 + 1 for i in range(24)]
    assert all(r.model == "tiny-classifier" for r in responses)


def test_classify_stream_ids_from_metadata_or_generated(stub) -> None:
    requests = [pb.ClassifyRequest(texts=["a"]), pb.ClassifyRequest(texts=["b"], request_id="own")]
    ids = [
        r.request_id for r in stub.ClassifyStream(iter(requests), metadata=(("x-request-id", "s"),))
    ]
    assert ids == ["s", "own"]
    ids = [r.request_id for r in stub.ClassifyStream(iter(requests[:1] * 2))]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]


def test_classify_stream_error_ends_stream(stub) -> None:
    requests = [pb.ClassifyRequest(texts=["ok"], request_id="a"), pb.ClassifyRequest(texts=[])]
    call = stub.ClassifyStream(iter(requests))
    first = next(call)
    assert first.request_id == "a"
    err = error_of(lambda: next(call))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_field(err) == "texts"


def test_cancelled_classify_stream_drops_its_queued_requests(
    start_server, model_repo: Path
) -> None:
    # a batcher that holds rows for 10 s: the stream's 8 requests (its window) all wait there
    add_variant(
        model_repo, "tiny-classifier", "slow", batching={"max_batch": 64, "max_delay_ms": 10_000}
    )
    running = start_server(model_repo)
    batcher = running.model("slow").batcher
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        requests = [pb.ClassifyRequest(texts=["a"], model="slow")] * 8
        call = stub.ClassifyStream(iter(requests), wait_for_ready=True)
        wait_for(lambda: batcher.queue_depth == 8)
        cancelled_at = time.monotonic()
        call.cancel()
        # every request of the stream leaves the queue, well before its batch was due
        wait_for(lambda: batcher.queue_depth == 0, timeout=4)
        assert time.monotonic() - cancelled_at < 4
        # and the model still answers
        resp = stub.Classify(pb.ClassifyRequest(texts=["b"], model="tiny-classifier"))
        assert len(resp.results) == 1


def test_generate_and_stream_agree(stub) -> None:
    req = pb.GenerateRequest(prompt="the service answered", max_new_tokens=12, request_id="g1")
    resp = stub.Generate(req)
    assert (resp.model, resp.model_version, resp.request_id) == ("tiny-generator", "1", "g1")
    assert resp.finish_reason in (pb.LENGTH, pb.EOS) and not resp.prompt_truncated
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.completion_tokens == len(resp.token_ids) <= 12
    chunks = list(stub.GenerateStream(req))
    assert chunks[0].model == "tiny-generator" and chunks[0].model_version == "1"
    assert all(c.request_id == "g1" for c in chunks)
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].finish_reason == resp.finish_reason
    assert chunks[-1].usage == resp.usage
    assert "".join(c.text for c in chunks) == resp.text  # greedy: the same completion
    assert [t for c in chunks for t in c.token_ids] == list(resp.token_ids)


def test_generate_default_length_and_truncation(stub) -> None:
    resp = stub.Generate(pb.GenerateRequest(prompt="the service " * 60))
    assert resp.prompt_truncated and resp.usage.prompt_tokens == 64
    if resp.finish_reason == pb.LENGTH:
        assert resp.usage.completion_tokens == 16  # the manifest's default_new_tokens


# -- validation ----------------------------------------------------------------------------------

C, G = pb.ClassifyRequest, pb.GenerateRequest
SP = pb.SamplingParams
INVALID = [
    ("Classify", C(texts=[]), "texts"),
    ("Classify", C(texts=["a", "", "b"]), "texts[1]"),
    ("Classify", C(texts=["a"] * 33), "texts"),
    ("Classify", C(texts=["word " * 100], reject_overlong=True), "texts[0]"),
    ("Generate", G(prompt=""), "prompt"),
    ("Generate", G(prompt="hi", max_new_tokens=65), "max_new_tokens"),
    ("Generate", G(prompt="hi", sampling=SP(temperature=-0.5)), "sampling.temperature"),
    ("Generate", G(prompt="hi", sampling=SP(temperature=101)), "sampling.temperature"),
    ("Generate", G(prompt="hi", sampling=SP(temperature=float("nan"))), "sampling.temperature"),
    ("Generate", G(prompt="hi", sampling=SP(top_p=1.5)), "sampling.top_p"),
    ("Generate", G(prompt="hi", sampling=SP(top_k=10**6)), "sampling.top_k"),
    ("Generate", G(prompt="hi", sampling=SP(repetition_penalty=11)), "sampling.repetition_penalty"),
    ("Generate", G(prompt="hi", stop=["x"] * 9), "stop"),
    ("Generate", G(prompt="hi", stop=["a", ""]), "stop[1]"),
    ("Generate", G(prompt="hi", stop=["y" * 65]), "stop[0]"),
    ("Generate", G(prompt="word " * 100, reject_overlong=True), "prompt"),
    ("GenerateStream", G(prompt="hi", sampling=SP(top_p=-0.1)), "sampling.top_p"),
]


@pytest.mark.parametrize(("rpc", "request_msg", "field"), INVALID, ids=[f for _, _, f in INVALID])
def test_invalid_argument_names_field(stub, rpc: str, request_msg, field: str) -> None:
    method = getattr(stub, rpc)
    err = error_of(
        lambda: list(method(request_msg)) if rpc.endswith("Stream") else method(request_msg)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(err) == field
    assert err.details()


@pytest.mark.parametrize(
    ("rpc", "request_msg"),
    [
        ("Classify", C(model="nope", texts=["a"])),
        ("Classify", C(model="tiny-classifier", model_version="7", texts=["a"])),
        ("Classify", C(model="tiny-generator", texts=["a"])),
        ("Generate", G(model="tiny-classifier", prompt="a")),
        ("GenerateStream", G(model="nope", prompt="a")),
    ],
)
def test_not_found(stub, rpc: str, request_msg) -> None:
    method = getattr(stub, rpc)
    err = error_of(
        lambda: list(method(request_msg)) if rpc.endswith("Stream") else method(request_msg)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert request_msg.model in err.details()
    assert "/" not in err.details()  # no paths


# -- load, failures, cancellation --------------------------------------------------------------


def test_resource_exhausted_when_slots_and_queue_full(start_server, model_repo: Path) -> None:
    add_variant(model_repo, "tiny-generator", "busy", batching={"max_batch": 1, "max_queue": 0})
    running = start_server(model_repo)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        req = pb.GenerateRequest(model="busy", prompt="the service", max_new_tokens=64)
        futures = [stub.Generate.future(req) for _ in range(8)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "queue" in err.details()
        assert grpc.StatusCode.OK in codes
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_internal_error_keeps_serving(start_server, model_repo: Path) -> None:
    # The manifest promises 400 tokens but the checkpoint has 128 positions: a long text
    # makes the backend fail at call time, as a corrupted artifact would.
    add_variant(model_repo, "tiny-classifier", "broken", limits={"max_input_tokens": 400})
    running = start_server(model_repo)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        err = error_of(lambda: stub.Classify(C(model="broken", texts=["word " * 300])))
        assert err.code() == grpc.StatusCode.INTERNAL
        assert "Traceback" not in err.details() and "/" not in err.details()
        assert str(model_repo) not in err.details()
        assert len(stub.Classify(C(model="broken", texts=["short"])).results) == 1
        assert len(stub.Classify(C(texts=["still serving"])).results) == 1


def _generated(running: RunningServer, name: str) -> float:
    from headrace.server.metrics import REGISTRY

    return REGISTRY.get_sample_value("headrace_generation_tokens_total", {"model": name}) or 0.0


def test_cancel_mid_stream_frees_slot(start_server, long_models: Path) -> None:
    running = start_server(long_models)
    model = running.model("long-generator")
    before = _generated(running, "long-generator")
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.GenerateStream(G(model="long-generator", prompt="the", max_new_tokens=400))
        first = next(call)
        assert first.model == "long-generator"
        assert model.active_slots == 1
        call.cancel()
        wait_for(lambda: model.active_slots == 0)
        # generation stopped early: far fewer than the 400 tokens asked for were made
        time.sleep(0.2)
        made = _generated(running, "long-generator") - before
        assert 0 < made < 300, made
        # the slot is usable again
        resp = stub.Generate(G(model="long-generator", prompt="the", max_new_tokens=3))
        assert resp.usage.completion_tokens <= 3


def test_deadline_stops_generation(start_server, long_models: Path) -> None:
    running = start_server(long_models)
    model = running.model("long-generator")
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        req = G(model="long-generator", prompt="the", max_new_tokens=400)
        err = error_of(lambda: list(stub.GenerateStream(req, timeout=0.05)))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        err = error_of(lambda: stub.Generate(req, timeout=0.05))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: model.active_slots == 0)


# -- health, reflection, drain, hot reload -------------------------------------------------------


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_per_service(server: RunningServer) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    names = ("", "headrace.v1.Inference", "inference.GRPCInferenceService")
    for name in (*names, "tiny-classifier", "tiny-generator"):
        assert _health(server.address, name) == serving, name
    err = error_of(lambda: _health(server.address, "no-such-model"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert names == {
            "headrace.v1.Inference",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="headrace.v1.Inference"
        )
        response = next(stub.ServerReflectionInfo(iter([request])))
        assert response.file_descriptor_response.file_descriptor_proto


def test_drain_finishes_stream_and_refuses_new_calls(start_server, long_models: Path) -> None:
    running = start_server(long_models, grace_period_s=10.0)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.GenerateStream(G(model="long-generator", prompt="the", max_new_tokens=300))
        next(call)
        health = health_pb2_grpc.HealthStub(channel)
        watches = [
            health.Watch(health_pb2.HealthCheckRequest(service=name))
            for name in ("", "long-generator")
        ]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping = running.submit(lambda: running.server.stop())
        # health says NOT_SERVING at once; the Watch streams end once the drain is over
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        wait_for(lambda: running.server.service.draining)  # after the GOAWAY
        err = error_of(lambda: stub.Classify(C(texts=["new call"])))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(call)  # the stream in flight runs to its end
        assert rest[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert rest[-1].usage.completion_tokens == 300 or rest[-1].finish_reason == pb.EOS
        stopping.result(15)
        for watch in watches:
            assert list(watch) == [] and watch.code() == grpc.StatusCode.OK


def _stream_until_stopped(running: RunningServer, stop: Callable[[], None]) -> grpc.RpcError:
    """Start a long stream, run `stop`, and return how the stream ended."""
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.GenerateStream(G(model="long-generator", prompt="the", max_new_tokens=400))
        next(call)
        stop()
        chunks: list[pb.GenerateChunk] = []
        err = error_of(lambda: chunks.extend(call))
        assert sum(len(c.token_ids) for c in chunks) < 399  # cut short, not finished
        return err


def test_calls_past_grace_period_are_cancelled(start_server, long_models: Path) -> None:
    running = start_server(long_models, grace_period_s=0.2)
    model = running.model("long-generator")
    stopping: list[concurrent.futures.Future[None]] = []
    err = _stream_until_stopped(
        running, lambda: stopping.append(running.submit(lambda: running.server.stop()))
    )
    assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    stopping[0].result(15)
    assert model.active_slots == 0


def test_hurry_ends_a_long_drain(start_server, long_models: Path) -> None:
    running = start_server(long_models, grace_period_s=120)
    stopping: list[concurrent.futures.Future[None]] = []

    def stop_then_hurry() -> None:
        stopping.append(running.submit(lambda: running.server.stop()))
        wait_for(lambda: running.server.service.draining)
        running.loop.call_soon_threadsafe(running.server.hurry)

    err = _stream_until_stopped(running, stop_then_hurry)
    assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    stopping[0].result(15)  # far sooner than the 120 s grace period


def test_hot_reload_new_and_removed_versions(start_server, model_repo: Path) -> None:
    import shutil

    running = start_server(model_repo, poll_interval_s=0.1)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)

        def versions() -> list[str]:
            models = stub.ListModels(pb.ListModelsRequest(task=pb.TASK_CLASSIFY)).models
            return list(models[0].versions)

        staging = model_repo / ".staging"
        shutil.copytree(model_repo / "tiny-classifier" / "1", staging)
        staging.rename(model_repo / "tiny-classifier" / "2")
        wait_for(lambda: versions() == ["2", "1"])
        assert stub.Classify(C(texts=["hi"])).model_version == "2"
        assert stub.Classify(C(texts=["hi"], model_version="1")).model_version == "1"
        # a broken version is skipped; the rest keep serving
        broken = model_repo / "tiny-classifier" / "3"
        broken.mkdir()
        (broken / "headrace.json").write_text("{not json")
        shutil.rmtree(model_repo / "tiny-classifier" / "1")
        wait_for(lambda: versions() == ["2"])
        err = error_of(lambda: stub.Classify(C(texts=["hi"], model_version="1")))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert stub.Classify(C(texts=["hi"])).model_version == "2"
        # a new model name gets its own health entry
        shutil.copytree(model_repo / "tiny-classifier" / "2", model_repo / "second" / "1")
        wait_for(
            lambda: any(
                m.name == "second" and m.versions
                for m in stub.ListModels(pb.ListModelsRequest()).models
            )
        )
        assert _health(running.address, "second") == health_pb2.HealthCheckResponse.SERVING
        shutil.rmtree(model_repo / "second")
        wait_for(
            lambda: _health(running.address, "second") == health_pb2.HealthCheckResponse.NOT_SERVING
        )


def test_concurrent_calls(stub) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        classify = [pool.submit(stub.Classify, C(texts=[f"text {i}"])) for i in range(16)]
        generate = [
            pool.submit(stub.Generate, G(prompt=f"the {i}", max_new_tokens=4)) for i in range(8)
        ]
        assert all(len(f.result().results) == 1 for f in classify)
        assert all(f.result().usage.completion_tokens <= 4 for f in generate)

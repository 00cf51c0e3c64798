"""`headrace serve --workers 2 --engine-process --engine-tasks generate`: the engine
decodes, each front end runs Classify on its own sessions; real processes, real sockets.
One repository to the callers (every RPC, model lists, health), each side's own hot
reload, and Classify answering while the engine is gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headrace.server.engine_ipc.split import TaskFilter
from headrace.server.kserve.pb import grpc_service_pb2 as kpb
from headrace.server.kserve.pb import grpc_service_pb2_grpc as kgrpc
from headrace.server.manifest import MANIFEST_NAME
from headrace.server.types import Task
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.e2e.test_engine_process import Engine, G, kill_engine_under_a_stream
from tests.e2e.test_workers import GEN, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CLS = "tiny-classifier"


@pytest.fixture(scope="module")
def split(long_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    running = Engine(long_models, tmp_path_factory.mktemp("split"), "--engine-tasks", "generate")
    yield running
    running.stop()


def loaded_by(running: Engine) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for line in running.events("model_version_ready"):
        out.setdefault(line["model"], set()).add(line["pid"])
    return out


def health(channel: grpc.Channel, name: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status)


def test_each_side_loads_its_own_tasks(split: Engine) -> None:
    wait_for(lambda: len(loaded_by(split).get(CLS, ())) == 2)
    loaded = loaded_by(split)
    assert loaded[GEN] == set(split.engine_pids())  # the generator: the engine only
    assert loaded[CLS] == split.worker_pids()  # the classifier: in each front end


def test_every_rpc_sees_one_repository(split: Engine) -> None:
    with grpc.insecure_channel(split.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert set(models) == {CLS, GEN}
        assert models[CLS].task == pb.TASK_CLASSIFY and models[GEN].task == pb.TASK_GENERATE
        got = stub.Classify(pb.ClassifyRequest(texts=["good", "bad"], top_k=2))
        assert len(got.results) == 2 and got.model == CLS  # the default classify model
        whole = stub.Generate(pb.GenerateRequest(prompt="the", max_new_tokens=5, sampling=pb.SamplingParams(
            ignore_eos=True)))  # fmt: skip
        assert whole.model == GEN and len(whole.token_ids) == 5  # the default generate model
        chunks = list(stub.GenerateStream(G(prompt="the", max_new_tokens=5, sampling=pb.SamplingParams(
            ignore_eos=True))))  # fmt: skip
        assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
        with pytest.raises(grpc.RpcError) as err:  # the classifier is not the engine's
            stub.Generate(G(model=CLS, prompt="the", max_new_tokens=2))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(model=GEN, texts=["a"]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        for name in ("", CLS, GEN):
            assert health(channel, name) == SERVING
        kserve = kgrpc.GRPCInferenceServiceStub(channel)
        assert kserve.ModelReady(kpb.ModelReadyRequest(name=CLS)).ready
        assert kserve.ModelReady(kpb.ModelReadyRequest(name=GEN)).ready
    with urllib.request.urlopen(f"http://127.0.0.1:{split.http_port}/v1/models", timeout=10) as r:
        assert {m["id"] for m in json.loads(r.read())["data"]} == {CLS, GEN}


def test_classify_answers_while_the_engine_is_gone(split: Engine) -> None:
    with grpc.insecure_channel(split.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        kill_engine_under_a_stream(split, stub)
        wait_for(lambda: health(channel, GEN) == NOT_SERVING, timeout=15)
        assert health(channel, CLS) == SERVING
        for _ in range(5):  # the front end's own classifier, engine or not
            assert len(stub.Classify(pb.ClassifyRequest(texts=["meanwhile"])).results) == 1
        wait_for(lambda: len(split.engine_pids()) == 2, timeout=30)
        wait_for(lambda: health(channel, GEN) == SERVING, timeout=60)
        out = stub.Generate(G(prompt="the", max_new_tokens=3))
        assert 1 <= out.usage.completion_tokens <= 3
    assert loaded_by(split)[CLS] == split.worker_pids()  # not reloaded: the front ends lived on


def test_hot_reload_on_both_sides(tiny_models: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    running = Engine(repo, tmp_path, "--poll-interval", "0.3", "--engine-tasks", "generate")
    try:

        def versions() -> set[tuple[tuple[str, tuple[str, ...]], ...]]:
            seen = set()
            for _ in range(16):  # connections on both front ends
                with grpc.insecure_channel(running.address) as channel:
                    models = pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest())
                    seen.add(tuple((m.name, tuple(m.versions)) for m in models.models))
            return seen

        assert versions() == {((CLS, ("1",)), ("tiny-generator", ("1",)))}
        shutil.copytree(repo / CLS / "1", repo / CLS / "2")
        shutil.copytree(repo / "tiny-generator" / "1", repo / "tiny-generator" / "2")
        wait_for(lambda: versions() == {((CLS, ("2", "1")), ("tiny-generator", ("2", "1")))},
                 timeout=60)  # fmt: skip
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            assert stub.Classify(pb.ClassifyRequest(texts=["new"])).model_version == "2"
            gen = stub.Generate(pb.GenerateRequest(model="tiny-generator", prompt="the",
                                                   max_new_tokens=2))  # fmt: skip
            assert gen.model_version == "2"
        ready = [ln for ln in running.events("model_version_ready") if ln["model_version"] == "2"]
        by_model: dict[str, set[int]] = {}
        for ln in ready:
            by_model.setdefault(ln["model"], set()).add(ln["pid"])
        assert by_model["tiny-generator"] == set(running.engine_pids())
        assert by_model[CLS] == running.worker_pids()
        shutil.rmtree(repo / "tiny-generator" / "2")  # removed: the engine retires it
        wait_for(lambda: versions() == {((CLS, ("2", "1")), ("tiny-generator", ("1",)))},
                 timeout=60)  # fmt: skip
    finally:
        assert running.stop() == 0


def test_a_broken_manifest_fails_in_the_front_end(tiny_models: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / MANIFEST_NAME).write_text("{not json")
    running = Engine(repo, tmp_path, "--engine-tasks", "generate")
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
            assert set(models) == {CLS, "tiny-generator", "broken"}
            assert [s.state for s in models["broken"].version_status] == [pb.MODEL_STATE_FAILED]
            assert "headrace.json" in models["broken"].version_status[0].reason
        failed = running.events("model_version_skipped")
        assert {ln["pid"] for ln in failed} <= running.worker_pids() and failed  # not the engine
    finally:
        assert running.stop() == 0


def test_engine_tasks_names_what_it_takes(long_models: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "headrace.server", "serve", "--models", str(long_models),
         "--engine-tasks", "generate,embed"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "engine_tasks takes one or more of classify, generate, not embed" in out.stderr


def _manifest(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).write_text(text)
    return folder


def test_task_filter_reads_each_manifest_once_per_change(tmp_path: Path) -> None:
    cls = _manifest(tmp_path / "a", json.dumps({"task": "classify"}))
    gen = _manifest(tmp_path / "b", json.dumps({"task": "generate"}))
    bad = _manifest(tmp_path / "c", "{")
    odd = _manifest(tmp_path / "d", json.dumps({"task": "embed"}))
    engine = TaskFilter(frozenset({Task.GENERATE}), unreadable=False)
    front = TaskFilter(frozenset({Task.CLASSIFY}), unreadable=True)
    assert [engine(p) for p in (cls, gen, bad, odd)] == [False, True, False, False]
    assert [front(p) for p in (cls, gen, bad, odd)] == [True, False, True, True]
    assert not engine(tmp_path / "gone") and front(tmp_path / "gone")
    stamp = (gen / MANIFEST_NAME).stat()
    (gen / MANIFEST_NAME).write_text(json.dumps({"task": "classify"}))
    os.utime(gen / MANIFEST_NAME, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert engine(gen)  # the same mtime: not read again
    os.utime(gen / MANIFEST_NAME, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    assert not engine(gen) and front(gen)  # changed: read again

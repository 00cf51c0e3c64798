"""Failed and hung model loads, as callers and operators see them, over a real socket.

A repository with a good ONNX version next to a truncated one, and a model whose only
version is corrupt: ListModels shows every version with its state and a reason without
paths; calls get UNAVAILABLE naming the state (an unknown name stays NOT_FOUND); health,
KServe and `headrace models --server` agree. A version whose load blocks (its ONNX file
is a FIFO nobody writes, so ONNX Runtime waits in open()) fails with "load timed out"
while the others serve.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headrace.client import Client, ModelState, NotFound, Unavailable
from headrace.server.kserve.pb import grpc_service_pb2 as kpb
from headrace.server.kserve.pb import grpc_service_pb2_grpc as kpb_grpc
from headrace.server.manifest import MANIFEST_NAME
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.e2e.conftest import RunningServer, free_port

GOOD = "tiny-classifier"
BROKEN = "broken"


def _truncate_onnx(version_dir: Path) -> None:
    for onnx in version_dir.glob("*.onnx"):
        data = onnx.read_bytes()
        onnx.write_bytes(data[: len(data) // 3])


@pytest.fixture()
def broken_repo(onnx_models: Path, tmp_path: Path) -> Path:
    """tiny-classifier/1 (good ONNX), tiny-classifier/2 and broken/1 (truncated ONNX)."""
    root = tmp_path / "models"
    shutil.copytree(onnx_models / GOOD / "1", root / GOOD / "1")
    shutil.copytree(onnx_models / GOOD / "1", root / GOOD / "2")
    _truncate_onnx(root / GOOD / "2")
    shutil.copytree(onnx_models / GOOD / "1", root / BROKEN / "1")
    _truncate_onnx(root / BROKEN / "1")
    return root


@pytest.fixture()
def running(start_server, broken_repo: Path) -> RunningServer:
    server: RunningServer = start_server(
        broken_repo, profile="cpu", backend="onnxruntime", http_port=free_port()
    )
    return server


@pytest.fixture()
def stub(running: RunningServer) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(running.address) as channel:
        yield pb_grpc.InferenceStub(channel)


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _error(fn: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()  # type: ignore[operator]
    return info.value


def test_list_models_shows_every_version_and_why(
    stub: pb_grpc.InferenceStub, broken_repo: Path
) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    good, broken = models[GOOD], models[BROKEN]
    assert list(good.versions) == ["1"] and good.state == pb.MODEL_STATE_READY
    assert [(s.version, s.state) for s in good.version_status] == [
        ("2", pb.MODEL_STATE_FAILED),
        ("1", pb.MODEL_STATE_READY),
    ]
    assert good.backend == "onnxruntime" and list(good.labels)
    assert list(broken.versions) == [] and broken.state == pb.MODEL_STATE_FAILED
    assert broken.task == pb.TASK_CLASSIFY  # the manifest was read; the ONNX file was not
    (status,) = broken.version_status
    assert status.state == pb.MODEL_STATE_FAILED and status.reason
    for s in (status, good.version_status[0]):
        # the version folder is named NAME/VERSION, no absolute path is left
        assert "model.int8.onnx" in s.reason and "Protobuf parsing failed" in s.reason
        assert not re.search(r"(^|[\s'\"(])/", s.reason), s.reason
        assert str(broken_repo) not in s.reason and "tmp" not in s.reason
    # filtered by task, the failed model is still listed (its task is known)
    listed = stub.ListModels(pb.ListModelsRequest(task=pb.TASK_CLASSIFY)).models
    assert {m.name for m in listed} == {GOOD, BROKEN}
    assert not stub.ListModels(pb.ListModelsRequest(task=pb.TASK_GENERATE)).models


def test_calls_to_a_failed_model_are_unavailable_naming_the_state(
    stub: pb_grpc.InferenceStub,
) -> None:
    err = _error(lambda: stub.Classify(pb.ClassifyRequest(model=BROKEN, texts=["hi"])))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed to load" in err.details() and "version 1" in err.details()
    err = _error(
        lambda: stub.Classify(pb.ClassifyRequest(model=GOOD, model_version="2", texts=["hi"]))
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "version 2 failed" in err.details()
    # the good version keeps serving, unknown names and versions stay NOT_FOUND
    assert stub.Classify(pb.ClassifyRequest(model=GOOD, texts=["hi"])).model_version == "1"
    for model, version in (("nope", ""), (GOOD, "7")):
        request = pb.ClassifyRequest(model=model, model_version=version, texts=["hi"])
        err = _error(lambda r=request: stub.Classify(r))
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_kserve_say_not_ready(running: RunningServer) -> None:
    assert _health(running.address, BROKEN) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(running.address, GOOD) == health_pb2.HealthCheckResponse.SERVING
    assert _health(running.address, "") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(running.address) as channel:
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert not kserve.ModelReady(kpb.ModelReadyRequest(name=BROKEN)).ready
        assert not kserve.ModelReady(kpb.ModelReadyRequest(name=GOOD, version="2")).ready
        assert kserve.ModelReady(kpb.ModelReadyRequest(name=GOOD)).ready
        err = _error(lambda: kserve.ModelMetadata(kpb.ModelMetadataRequest(name=BROKEN)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "failed" in err.details()
        err = _error(lambda: kserve.ModelMetadata(kpb.ModelMetadataRequest(name="nope")))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest()).models
        states = {(m.name, m.version): (m.state, bool(m.reason)) for m in index}
        assert states == {
            (GOOD, "2"): ("UNAVAILABLE", True),
            (GOOD, "1"): ("READY", False),
            (BROKEN, "1"): ("UNAVAILABLE", True),
        }


def test_http_front_lists_ready_models_and_says_why_not(running: RunningServer) -> None:
    with urllib.request.urlopen(f"{running.http_url}/v1/models", timeout=10) as response:
        listed = json.loads(response.read())
    assert [m["id"] for m in listed["data"]] == [GOOD]  # OpenAI's list has no state field
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{running.http_url}/v1/models/{BROKEN}", timeout=10)
    assert info.value.code == 503
    assert "failed to load" in json.loads(info.value.read())["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{running.http_url}/v1/models/nope", timeout=10)
    assert info.value.code == 404


def test_sdk_and_cli_carry_the_states(running: RunningServer) -> None:
    with Client(running.address, timeout=10) as client:
        models = {m.name: m for m in client.models()}
        assert models[GOOD].ready and models[GOOD].latest_version == "1"
        assert [s.version for s in models[GOOD].failed] == ["2"]
        broken = models[BROKEN]
        assert broken.state is ModelState.FAILED and not broken.ready and broken.versions == ()
        assert broken.version_status[0].reason
        with pytest.raises(Unavailable, match="failed to load"):
            client.classify("hi", model=BROKEN)
        with pytest.raises(NotFound):
            client.classify("hi", model="nope")
    cli = [sys.executable, "-m", "headrace.server", "models", "--server", running.address]
    table = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = {tuple(line.split()[:3]) for line in table.stdout.splitlines()[1:]}
    assert {(GOOD, "2", "failed"), (GOOD, "1", "ready"), (BROKEN, "1", "failed")} <= lines
    rows = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True).stdout)
    assert {(r["name"], r["version"], r["state"]) for r in rows} == {
        (GOOD, "2", "failed"),
        (GOOD, "1", "ready"),
        (BROKEN, "1", "failed"),
    }


def test_a_fixed_version_is_loaded_again(
    running: RunningServer, stub: pb_grpc.InferenceStub, broken_repo: Path, onnx_models: Path
) -> None:
    for onnx in (onnx_models / GOOD / "1").glob("*.onnx"):
        shutil.copy(onnx, broken_repo / BROKEN / "1" / onnx.name)
    (broken_repo / BROKEN / "1" / MANIFEST_NAME).touch()  # a changed manifest: tried again
    running.call(running.server.repository.refresh)
    assert stub.Classify(pb.ClassifyRequest(model=BROKEN, texts=["hi"])).model_version == "1"
    assert _health(running.address, BROKEN) == health_pb2.HealthCheckResponse.SERVING
    # removing the failed version forgets it
    shutil.rmtree(broken_repo / GOOD / "2")
    running.call(running.server.repository.refresh)
    (good,) = [m for m in stub.ListModels(pb.ListModelsRequest()).models if m.name == GOOD]
    assert [s.version for s in good.version_status] == ["1"]


# -- a load that hangs ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_hung_load_times_out_and_the_others_serve(
    start_server, onnx_models: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    """The real ONNX Runtime load of `hangs/1`, held at its start until the test lets it
    go (as a stuck mount or a device that never answers would): it fails after the load
    timeout while tiny-classifier serves, and what it built when let go is closed.

    (A FIFO in the version folder cannot stand in: the backends refuse files that are not
    regular, and `tokenizers` would block in open() holding the GIL, which no timeout
    in the process can interrupt.)"""
    from headrace.edge import ort_backend

    root = tmp_path / "models"
    shutil.copytree(onnx_models / GOOD / "1", root / GOOD / "1")
    shutil.copytree(onnx_models / GOOD / "1", root / "hangs" / "1")
    release = threading.Event()
    real_open = ort_backend.open_session

    def open_session(path: Path, options: dict[str, object]) -> object:
        if "hangs" in Path(path).parts:
            release.wait(30)
        return real_open(path, options)

    monkeypatch.setattr(ort_backend, "open_session", open_session)
    started = time.monotonic()
    running = start_server(root, profile="cpu", backend="onnxruntime", load_timeout_s=1.0)
    try:
        assert time.monotonic() - started < 15
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
            (status,) = models["hangs"].version_status
            assert status.state == pb.MODEL_STATE_FAILED
            assert status.reason == "load timed out after 1 s"
            err = _error(lambda: stub.Classify(pb.ClassifyRequest(model="hangs", texts=["x"])))
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "timed out" in err.details()
            assert stub.Classify(pb.ClassifyRequest(model=GOOD, texts=["x"])).model_version == "1"
            assert _health(running.address, "hangs") == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        release.set()
    # the abandoned load finishes in its own thread; what it built is closed, not served
    seen = ""
    end = time.monotonic() + 10
    while "model_version_load_finished_late" not in seen and time.monotonic() < end:
        time.sleep(0.05)
        seen += capfd.readouterr().err
    assert "model_version_load_finished_late" in seen
    assert "hangs" not in running.server.repository.names()

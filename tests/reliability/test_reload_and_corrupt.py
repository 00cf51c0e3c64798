"""Model files changing under a serving server: hot reload under load loses no call;
corrupt manifests and truncated ONNX files are skipped with a log line while every
other version keeps serving.

(tests/e2e/test_server.py reloads without load; tests/server/test_repository.py skips
a broken manifest and missing weights without looking at the log.)"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from headrace.server.manifest import MANIFEST_NAME
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc


def wait_for(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def versions(stub: pb_grpc.InferenceStub) -> dict[str, list[str]]:
    return {m.name: list(m.versions) for m in stub.ListModels(pb.ListModelsRequest()).models}


def drop_in(repo: Path, name: str, source: str, version: str) -> None:
    """Copy `name`/`source` to `name`/`version` as a deploy would: whole, then renamed in."""
    staging = repo / f".staging-{name}-{version}"
    shutil.copytree(repo / name / source, staging)
    staging.rename(repo / name / version)


def test_hot_reload_under_load_fails_no_call(start_server, model_repo: Path) -> None:
    running = start_server(model_repo, poll_interval_s=0.1)
    stop = threading.Event()
    answered: Counter[str] = Counter()
    failures: list[str] = []

    def caller(kind: str) -> None:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            while not stop.is_set():
                try:
                    if kind == "classify":
                        out = stub.Classify(pb.ClassifyRequest(texts=["a b c"]), timeout=30)
                        answered[f"classify v{out.model_version}"] += 1
                    elif kind == "stream":
                        requests = iter([pb.ClassifyRequest(texts=["x"])] * 3)
                        for out in stub.ClassifyStream(requests, timeout=30):
                            answered[f"classify v{out.model_version}"] += 1
                    else:
                        request = pb.GenerateRequest(prompt="the", max_new_tokens=4)
                        chunks = list(stub.GenerateStream(request, timeout=30))
                        answered[f"generate v{chunks[0].model_version}"] += 1
                except grpc.RpcError as err:
                    failures.append(f"{kind}: {err.code()} {err.details()}")  # type: ignore[attr-defined]

    threads = [threading.Thread(target=caller, args=(k,)) for k in
               ("classify", "classify", "stream", "generate", "generate")]  # fmt: skip
    for t in threads:
        t.start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            time.sleep(0.5)
            for name in ("tiny-classifier", "tiny-generator"):
                drop_in(model_repo, name, "1", "2")
            wait_for(lambda: all(v[0] == "2" for v in versions(stub).values()))
            time.sleep(0.5)  # load on both versions
            for name in ("tiny-classifier", "tiny-generator"):
                shutil.rmtree(model_repo / name / "1")
            wait_for(lambda: all(v == ["2"] for v in versions(stub).values()))
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:5]
    for seen in ("classify v1", "classify v2", "generate v1", "generate v2"):
        assert answered[seen] > 0, answered
    assert sum(answered.values()) > 100, answered


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _skip_lines(err: str) -> list[dict]:
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("level") in ("warning", "error") and e.get("model")]


def _named(capfd: pytest.CaptureFixture[str], into: dict) -> dict:
    """`into` updated with the warning lines logged since: (model, version) -> line."""
    for line in _skip_lines(capfd.readouterr().err):
        into[(line["model"], str(line.get("model_version")))] = line
    return into


def test_corrupt_manifests_and_truncated_onnx_are_skipped_with_a_log_line(
    start_server, onnx_models: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(onnx_models, repo)
    broken: dict[tuple[str, str], str] = {}

    def version_of(name: str, version: str, why: str) -> Path:
        dest = repo / name / version
        shutil.copytree(repo / name / "1", dest)
        broken[(name, version)] = why
        return dest

    for onnx in version_of("tiny-classifier", "2", "truncated ONNX").glob("*.onnx"):
        _truncate(onnx, 0.5)
    for onnx in version_of("tiny-generator", "2", "empty ONNX").glob("*.onnx"):
        onnx.write_bytes(b"")
    (version_of("tiny-classifier", "3", "not JSON") / MANIFEST_NAME).write_text("{not json")
    (version_of("tiny-classifier", "4", "an empty object") / MANIFEST_NAME).write_text("{}")
    (version_of("tiny-classifier", "5", "a list") / MANIFEST_NAME).write_text("[1, 2]")
    manifest = version_of("tiny-generator", "3", "an unknown task") / MANIFEST_NAME
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "task": "juggle"}))
    (version_of("tiny-generator", "4", "cut short") / MANIFEST_NAME).write_bytes(
        manifest.read_bytes()[:40]
    )

    capfd.readouterr()
    seen: dict[tuple[str, str], dict] = {}
    running = start_server(repo, backend="onnxruntime", poll_interval_s=0.1, log_level="info")
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert versions(stub) == {"tiny-classifier": ["1"], "tiny-generator": ["1"]}
        assert stub.Classify(pb.ClassifyRequest(texts=["still serving"]), timeout=30).results
        out = stub.Generate(pb.GenerateRequest(prompt="the", max_new_tokens=3), timeout=30)
        assert out.model_version == "1" and out.usage.completion_tokens <= 3

        # a truncated version dropped in while serving: skipped too, the rest serve on
        dest = repo / "tiny-classifier" / "6"
        shutil.copytree(repo / "tiny-classifier" / "1", repo / ".staging")
        for onnx in (repo / ".staging").glob("*.onnx"):
            _truncate(onnx, 0.3)
        (repo / ".staging").rename(dest)
        broken[("tiny-classifier", "6")] = "truncated ONNX, hot"
        wait_for(lambda: ("tiny-classifier", "6") in _named(capfd, seen))
        assert versions(stub) == {"tiny-classifier": ["1"], "tiny-generator": ["1"]}
        assert stub.Classify(pb.ClassifyRequest(texts=["still serving"]), timeout=30).results
    _named(capfd, seen)
    for key, why in broken.items():
        assert key in seen, (key, why)
        line = seen[key]
        assert str(repo) not in json.dumps(line), line  # no paths in the log line's reason
        assert line.get("reason"), (why, line)

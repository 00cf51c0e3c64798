"""Artifact choice per profile (server/profiles.py), and ModelRepository: lookup, failures,
hot reload, retirement."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from headrace.server.backends.builtin import tensorrt_available
from headrace.server.backends.registry import declarations, profile_order
from headrace.server.errors import ModelNotFound
from headrace.server.manifest import MANIFEST_NAME, Artifact, Manifest
from headrace.server.models import ClassifierModel, GeneratorModel
from headrace.server.profiles import (
    NoArtifact,
    ProfileError,
    choose_artifact,
    cuda_available,
    resolve_profile,
)
from headrace.server.repository import ModelRepository, scan
from headrace.server.types import ClassifyCall, Task

TORCH = Artifact("torch", "hf")
ORT = Artifact("onnxruntime", "model.int8.onnx", "int8")


def manifest(*artifacts: Artifact) -> Manifest:
    return Manifest(task=Task.CLASSIFY, tokenizer="tokenizer.json", artifacts=artifacts,
                    labels=("a", "b"))  # fmt: skip


def test_choice_per_profile() -> None:
    both = manifest(TORCH, ORT)
    assert choose_artifact(both, "edge", None).artifact == ORT
    assert choose_artifact(both, "cpu", None).artifact == ORT
    choice = choose_artifact(manifest(TORCH), "cpu", None)
    assert (choice.backend, choice.device) == ("torch", "cpu")
    with pytest.raises(NoArtifact, match="onnxruntime"):
        choose_artifact(manifest(TORCH), "edge", None)
    assert choose_artifact(both, "edge", "cpu").device == "cpu"


def test_profile_orders_come_from_the_backends_declarations() -> None:
    assert set(declarations()) == {"onnxruntime", "torch", "tensorrt"}  # pyproject's entry points
    assert profile_order("edge") == ("onnxruntime",)
    assert profile_order("cpu") == ("onnxruntime", "torch")
    assert profile_order("datacenter") == ("tensorrt", "torch")
    assert declarations()["onnxruntime"].tasks == (Task.CLASSIFY, Task.GENERATE)
    with pytest.raises(ProfileError, match="unknown profile"):
        choose_artifact(manifest(TORCH), "mainframe", None)


@pytest.mark.skipif(tensorrt_available(), reason="checks the fallback where TensorRT is missing")
def test_an_engine_the_machine_cannot_run_is_passed_over() -> None:
    trt = Artifact("tensorrt", "model.plan", "fp16", {"gpu": "NVIDIA H100 80GB HBM3"})
    choice = choose_artifact(manifest(trt, TORCH), "datacenter", "cuda:0")
    assert (choice.backend, choice.device) == ("torch", "cuda:0")


def test_backend_narrows_the_profile() -> None:
    both = manifest(TORCH, ORT)
    assert choose_artifact(both, "cpu", None, "torch").artifact == TORCH
    assert choose_artifact(both, "cpu", None, "onnxruntime").artifact == ORT
    with pytest.raises(NoArtifact, match="torch"):
        choose_artifact(manifest(ORT), "cpu", None, "torch")
    with pytest.raises(ProfileError, match="not backend 'torch'"):
        choose_artifact(both, "edge", None, "torch")


@pytest.mark.skipif(cuda_available(), reason="checks the refusal on a machine without CUDA")
def test_datacenter_refused_without_cuda() -> None:
    with pytest.raises(ProfileError, match="CUDA"):
        resolve_profile("datacenter")
    assert resolve_profile("auto") == "cpu"
    assert resolve_profile("edge") == "edge"


def test_scan(tmp_path: Path) -> None:
    for rel in ("m/1", "m/10", "m/02", "m/tmp", "n/1", ".hidden/1"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / MANIFEST_NAME).write_text("{}")
    (tmp_path / "m" / "3").mkdir()  # no manifest yet: not a version
    assert sorted(scan(tmp_path)) == [("m", "1"), ("m", "10"), ("m", "2"), ("n", "1")]


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def repo_for(root: Path, **kwargs: Any) -> ModelRepository:
    return ModelRepository(root, profile="cpu", poll_interval_s=0, **kwargs)


def add_version(root: Path, name: str, version: str, src: str = "1") -> Path:
    dest = root / name / version
    shutil.copytree(root / name / src, dest)
    return dest


def test_lookup_and_listing(model_repo: Path) -> None:
    add_version(model_repo, "tiny-classifier", "2")

    async def body() -> None:
        repo = repo_for(model_repo)
        await repo.start()
        try:
            assert repo.default_name(Task.CLASSIFY) == "tiny-classifier"
            assert repo.get("", None, ClassifierModel).version == "2"
            assert repo.get("tiny-classifier", "1", ClassifierModel).version == "1"
            assert repo.get("tiny-classifier", "01", ClassifierModel).version == "1"
            assert repo.get(None, "", GeneratorModel).name == "tiny-generator"
            for name, version, kind in [
                ("nope", None, ClassifierModel),
                ("tiny-classifier", "9", ClassifierModel),
                ("tiny-classifier", "x", ClassifierModel),
                ("tiny-classifier", None, GeneratorModel),
            ]:
                with pytest.raises(ModelNotFound):
                    repo.get(name, version, kind)
            entries = {e.name: e for e in repo.list_models()}
            cls = entries["tiny-classifier"]
            assert cls.versions == ("2", "1") and cls.task is Task.CLASSIFY
            assert (cls.backend, cls.precision, cls.device) == ("torch", "fp32", "cpu")
            assert cls.labels == ("negative", "neutral", "positive") and cls.is_default
            assert [e.name for e in repo.list_models(Task.GENERATE)] == ["tiny-generator"]
        finally:
            await repo.stop()

    run(body)


def test_configured_default_and_missing_default(model_repo: Path) -> None:
    async def body() -> None:
        repo = repo_for(model_repo, defaults={Task.CLASSIFY: "other"})
        await repo.start()
        try:
            with pytest.raises(ModelNotFound, match="'other'"):
                repo.get("", None, ClassifierModel)
        finally:
            await repo.stop()

    run(body)


def test_broken_versions_are_skipped(model_repo: Path) -> None:
    bad_json = model_repo / "tiny-classifier" / "2"
    bad_json.mkdir()
    (bad_json / MANIFEST_NAME).write_text("{oops")
    no_weights = add_version(model_repo, "tiny-classifier", "3")
    shutil.rmtree(no_weights / "hf")

    async def body() -> None:
        repo = repo_for(model_repo)
        await repo.start()
        try:
            assert [e.versions for e in repo.list_models(Task.CLASSIFY)] == [("1",)]
            assert await repo.refresh() is False  # failed versions are not retried unchanged
        finally:
            await repo.stop()

    run(body)


def test_reload_adds_new_and_retires_removed_after_lease(model_repo: Path) -> None:
    async def body() -> None:
        repo = repo_for(model_repo)
        changes: list[list[str]] = []

        async def listener() -> None:
            changes.append(repo.names())

        repo.add_listener(listener)
        await repo.start()
        try:
            add_version(model_repo, "tiny-classifier", "2")
            assert await repo.refresh() is True
            assert repo.get("", None, ClassifierModel).version == "2"
            old = repo.get("tiny-classifier", "1", ClassifierModel)
            async with repo.lease("tiny-classifier", "1", ClassifierModel) as leased:
                shutil.rmtree(model_repo / "tiny-classifier" / "1")
                assert await repo.refresh() is True
                with pytest.raises(ModelNotFound):
                    repo.get("tiny-classifier", "1", ClassifierModel)
                # still leased: the old version keeps answering its in-flight call
                await asyncio.sleep(0.05)
                assert repo._retiring and old.batcher._executor is not None
                items = await leased.model.classify(ClassifyCall(texts=("still here",)))
                assert len(items) == 1
            for _ in range(100):  # stopped once the lease ends
                if not repo._retiring:
                    break
                await asyncio.sleep(0.02)
            assert not repo._retiring and old.batcher._executor is None
            assert changes and changes[-1] == ["tiny-classifier", "tiny-generator"]
        finally:
            await repo.stop()

    run(body)


def test_new_model_manifest_must_be_complete(model_repo: Path) -> None:
    # a manifest whose task needs labels it lacks is reported, not served
    dest = add_version(model_repo, "tiny-classifier", "2")
    data = json.loads((dest / MANIFEST_NAME).read_text())
    data["labels"] = []
    (dest / MANIFEST_NAME).write_text(json.dumps(data))

    async def body() -> None:
        repo = repo_for(model_repo)
        await repo.start()
        try:
            assert repo.get("", None, ClassifierModel).version == "1"
        finally:
            await repo.stop()

    run(body)


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run(repo_for(tmp_path / "none").start)

"""Backends by name. Each factory is imported only when a model asks for it,
so the server imports without torch, onnxruntime or tensorrt installed.

A factory is a class taking `BackendSpec` and returning an EncoderBackend or
DecoderBackend (server/backends/base.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headrace.server.manifest import Manifest
from headrace.server.types import Task

# (backend, task) -> "module:Class"
FACTORIES: dict[tuple[str, Task], str] = {
    ("torch", Task.CLASSIFY): "headrace.server.backends.torch_backend:TorchEncoder",
    ("torch", Task.GENERATE): "headrace.server.backends.torch_backend:TorchDecoder",
    ("onnxruntime", Task.CLASSIFY): "headrace.edge.ort_backend:OrtEncoder",
    ("onnxruntime", Task.GENERATE): "headrace.edge.ort_backend:OrtDecoder",
    ("tensorrt", Task.CLASSIFY): "headrace.server.backends.tensorrt_backend:TrtEncoder",
    ("tensorrt", Task.GENERATE): "headrace.server.backends.tensorrt_backend:TrtDecoder",
}


class BackendUnavailable(RuntimeError):
    """The backend's runtime is missing here (e.g. no tensorrt, no CUDA)."""


@dataclass(frozen=True)
class BackendSpec:
    """Everything a backend factory needs to load one model version."""

    task: Task
    backend: str
    path: Path  # the artifact, absolute
    precision: str
    device: str  # "cpu", "cuda", "cuda:0"
    manifest: Manifest
    version_dir: Path
    max_slots: int = 16  # decoder: KV-cache sequences
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"intra_op_threads": 2}


def load_backend(spec: BackendSpec) -> Any:
    try:
        target = FACTORIES[(spec.backend, spec.task)]
    except KeyError:
        raise BackendUnavailable(f"no backend {spec.backend!r} for task {spec.task.value}") from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {spec.backend!r} is not installed: {exc}") from exc
    return getattr(module, cls_name)(spec)

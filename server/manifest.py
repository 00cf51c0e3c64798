"""The model manifest: `NAME/VERSION/headrace.json`.

One version folder holds one model (one task, one set of labels, one
tokenizer) in one or more forms ("artifacts"): an HF checkpoint folder for
torch, an ONNX file for onnxruntime, a serialized engine for tensorrt. The
server's profile picks which form to serve (server/repository.py).

Example:

    {
      "format": 1,
      "task": "classify",
      "tokenizer": "tokenizer.json",
      "labels": ["negative", "neutral", "positive"],
      "artifacts": [
        {"backend": "torch", "path": "hf", "precision": "fp32"},
        {"backend": "onnxruntime", "path": "model.int8.onnx", "precision": "int8"}
      ],
      "limits": {"max_input_tokens": 128, "max_texts": 64},
      "batching": {"max_batch": 32, "max_delay_ms": 0.0, "max_queue": 1024},
      "generation": {"eos_token_id": 0, "max_context": 256, "chat_template": "plain"},
      "provenance": {"base": "...", "built_at": "...", "command": "..."},
      "card": {"accuracy": 0.78, ...}
    }

Imports nothing from headrace but `types` and `chat_template`, so build/ may write
manifests too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from headrace.server.chat_template import ChatTemplateError, chat_template
from headrace.server.types import Task

MANIFEST_NAME = "headrace.json"
FORMAT = 1


class ManifestError(ValueError):
    """The manifest is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Artifact:
    backend: str  # "torch" | "onnxruntime" | "tensorrt"
    path: str  # relative to the version folder
    precision: str = "fp32"
    # backend-specific facts, e.g. {"gpu": "NVIDIA H100 80GB HBM3"} for an engine,
    # {"kv_cache": true} for a decoder graph with past/present inputs
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int = 512  # tokens per text / prompt
    max_new_tokens: int = 256  # largest max_new_tokens accepted
    default_new_tokens: int = 64  # when the request says 0
    max_texts: int = 64  # texts per ClassifyRequest
    max_stop_strings: int = 8
    max_stop_length: int = 64


@dataclass(frozen=True)
class Batching:
    max_batch: int = 32  # encoder: texts per backend call; decoder: KV slots
    # encoder: extra wait for a batch to fill. 0 = none: a batch runs as soon as the
    # backend is free, and requests that arrive meanwhile form the next one, so a lone
    # caller pays no delay and a loaded server still fills its batches.
    max_delay_ms: float = 0.0
    max_queue: int = 1024  # requests waiting beyond the running batch
    # encoder: a batch is sorted by length and cut into groups whose padding stays
    # under this share of each group's tokens (1.0: never cut). Padding a batch of
    # tweets to its longest cost the int8 student 2x per text (2.5 ms vs 1.2 ms
    # at 0.1, an ad-hoc check on 1,024 tweets). GPUs want big batches: set 1.0 there.
    max_padding: float = 0.1


@dataclass(frozen=True)
class Generation:
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    max_context: int = 1024  # prompt + output tokens one KV slot holds
    # how chat messages become a prompt (server/chat_template.py): a built-in's name or a
    # table; None (manifests written before chat existed) means "plain"
    chat_template: str | dict[str, Any] | None = None


@dataclass(frozen=True)
class Manifest:
    task: Task
    tokenizer: str
    artifacts: tuple[Artifact, ...]
    labels: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    generation: Generation = field(default_factory=Generation)
    provenance: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)

    def artifact(self, backend: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.backend == backend), None)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["task"] = self.task.value
        return {"format": FORMAT, **data}

    def write(self, version_dir: Path) -> Path:
        path = Path(version_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        return path


def _sub(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ManifestError(f"{where} must be an object")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)}")
    return cls(**data)


def parse_manifest(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError("manifest must be a JSON object")
    if data.get("format", FORMAT) != FORMAT:
        raise ManifestError(f"unsupported manifest format {data.get('format')!r}")
    try:
        task = Task(data["task"])
    except (KeyError, ValueError) as exc:
        raise ManifestError("task must be 'classify' or 'generate'") from exc
    raw_artifacts = data.get("artifacts")
    if not isinstance(raw_artifacts, list) or not raw_artifacts:
        raise ManifestError("artifacts must be a non-empty list")
    artifacts = tuple(_sub(Artifact, a, "artifacts[]") for a in raw_artifacts)
    labels = tuple(str(x) for x in data.get("labels", ()))
    if task is Task.CLASSIFY and not labels:
        raise ManifestError("a classify model needs labels")
    tokenizer = data.get("tokenizer")
    if not isinstance(tokenizer, str) or not tokenizer:
        raise ManifestError("tokenizer must name the tokenizer.json file")
    generation = _sub(Generation, data.get("generation"), "generation")
    try:
        chat_template(generation.chat_template)
    except ChatTemplateError as exc:
        raise ManifestError(f"generation: {exc}") from None
    return Manifest(
        task=task,
        tokenizer=tokenizer,
        artifacts=artifacts,
        labels=labels,
        limits=_sub(Limits, data.get("limits"), "limits"),
        batching=_sub(Batching, data.get("batching"), "batching"),
        generation=generation,
        provenance=dict(data.get("provenance") or {}),
        card=dict(data.get("card") or {}),
    )


def read_manifest(version_dir: Path) -> Manifest:
    path = Path(version_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"no {MANIFEST_NAME}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"unreadable {MANIFEST_NAME}: {exc}") from exc
    return parse_manifest(data)

"""Results and inputs of the SDK: frozen dataclasses, free of Protobuf and gRPC."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "Classification",
    "ClassifyInput",
    "ClassifyResult",
    "FinishReason",
    "GenerateChunk",
    "GenerateResult",
    "HealthStatus",
    "Label",
    "ModelInfo",
    "ModelLimits",
    "Task",
    "Usage",
]


class FinishReason(enum.StrEnum):
    """Why generation ended. A result that has not ended carries `None` instead."""

    LENGTH = "length"  # max_new_tokens reached, or the model's context is full
    STOP = "stop"  # a stop string was produced
    EOS = "eos"  # the model produced its end-of-sequence token


class Task(enum.StrEnum):
    """What a model does."""

    CLASSIFY = "classify"
    GENERATE = "generate"


class HealthStatus(enum.StrEnum):
    """Serving status reported by the standard `grpc.health.v1.Health` service."""

    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    SERVICE_UNKNOWN = "service_unknown"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Label:
    """One label and its softmax probability in [0, 1]."""

    name: str
    score: float


@dataclass(frozen=True, slots=True)
class Classification:
    """The labels of one input text, best first."""

    labels: tuple[Label, ...]
    truncated: bool = False  # the text was cut to the model's max_input_tokens
    input_tokens: int = 0  # tokens of this text the model read

    @property
    def top(self) -> Label:
        """The best label. Raises IndexError when the server returned none."""
        return self.labels[0]

    def scores(self) -> dict[str, float]:
        """Label name -> score."""
        return {label.name: label.score for label in self.labels}


@dataclass(frozen=True, slots=True)
class ClassifyResult:
    """The answer to one classify request: one `Classification` per text, in input order."""

    model: str
    model_version: str
    results: tuple[Classification, ...]
    request_id: str
    usage: Usage

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> Classification:
        return self.results[index]


@dataclass(frozen=True, slots=True)
class ClassifyInput:
    """One request of `classify_stream`.

    Fields left at their defaults take the defaults given to `classify_stream` itself.
    """

    texts: str | Sequence[str]
    model: str = ""
    version: str = ""
    top_k: int = 0
    request_id: str | None = None
    reject_overlong: bool = False


@dataclass(frozen=True, slots=True)
class GenerateResult:
    """A whole completion (without the prompt and without a matched stop string)."""

    model: str
    model_version: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    usage: Usage
    request_id: str
    prompt_truncated: bool = False


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """A piece of a streamed completion.

    Concatenating `text` over the chunks gives the completion. Only the last chunk has
    `finish_reason` and `usage`; `model` and `model_version` are set on the first chunk.
    A chunk may hold several tokens (the request's `stream_interval`, or a reader that
    fell behind); `token_times_us` gives, per token of `token_ids`, when the server made
    it, in microseconds since the request entered the model's queue.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    usage: Usage | None
    request_id: str
    model: str = ""
    model_version: str = ""
    prompt_truncated: bool = False
    token_times_us: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Per-request limits the server enforces for a model (0 where not applicable)."""

    max_input_tokens: int = 0
    max_new_tokens: int = 0
    max_texts: int = 0
    max_stop_strings: int = 0
    max_stop_length: int = 0
    max_batch: int = 0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model: its ready versions (newest first), task and limits."""

    name: str
    versions: tuple[str, ...]
    task: Task | None
    labels: tuple[str, ...] = ()
    backend: str = ""
    profile: str = ""
    limits: ModelLimits = field(default_factory=ModelLimits)
    precision: str = ""
    device: str = ""
    is_default: bool = False

    @property
    def latest_version(self) -> str | None:
        return self.versions[0] if self.versions else None

"""Plain request and result types that cross layers (service <-> engine <-> backend).

This module imports nothing from headrace, so every layer may import it.
The service maps proto messages to these types and back (server/service.py);
the engine and the backends never see a proto message.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Task(enum.StrEnum):
    CLASSIFY = "classify"
    GENERATE = "generate"


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_new_tokens reached, or the context is full
    STOP = "stop"  # a stop string matched
    EOS = "eos"  # the model produced its end-of-sequence token


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-sequence sampling settings, already validated and defaulted.

    temperature == 0 means greedy; top_k == 0 and top_p == 1.0 disable those
    filters; repetition_penalty == 1.0 disables the penalty.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # generate past EOS until max_new_tokens (load tests)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class ClassifyItem:
    """One text's result: labels best first."""

    labels: tuple[tuple[str, float], ...]  # (name, probability), best first
    truncated: bool
    input_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateParams:
    """A validated generation request as the engine sees it."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """What the decoder scheduler yields for one sequence.

    `text` is new, complete text (never a broken multi-byte character, never
    part of a stop string); `finish_reason` is set on the last event only.
    Several tokens may be coalesced into one event when the reader falls behind.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class EngineError(Exception):
    """Base of the errors the engine raises; the service maps each to a status."""


class QueueFull(EngineError):
    """The model's queue (or its KV slots and queue) is full: RESOURCE_EXHAUSTED."""


class ShuttingDown(EngineError):
    """The engine is stopping and takes no new work: UNAVAILABLE."""


class BackendFailure(EngineError):
    """The backend raised while running this request's batch: INTERNAL.

    The message is safe to show a caller (no paths, no traceback); the cause
    is chained for the server's log.
    """


class InvalidInput(EngineError):
    """A request field is wrong in a way only the model can tell (e.g. too many
    tokens): INVALID_ARGUMENT with a BadRequest naming `field`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

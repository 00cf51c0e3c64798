"""Plain request and result types that cross layers (front <-> model <-> engine <-> backend).

This module imports nothing from headrace, so every layer may import it.
A front maps its wire format to the calls below and results back (the gRPC
front: server/convert.py); the models check calls (server/calls.py), the
engine and the backends never see a wire message.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
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
class ClassifyCall:
    """A classify request as every front hands it to a ClassifierModel, not yet checked."""

    texts: tuple[str, ...]
    model: str = ""  # "": the server's default classify model
    version: str = ""  # "": the newest served version
    top_k: int = 0  # labels per text, best first; 0: every label
    reject_overlong: bool = False  # a text over the token limit is an error, not truncated
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class StreamInterval:
    """When a stream's next message goes: once it holds `tokens` tokens and `ms`
    milliseconds have passed since the previous one (the first goes at once; the last
    takes what is left). vLLM's `--stream-interval` is the tokens rule alone."""

    tokens: int = 1
    ms: int = 0


MAX_STREAM_INTERVAL = 4096  # tokens per message
MAX_STREAM_INTERVAL_MS = 10_000


@dataclass(frozen=True, slots=True)
class GenerateCall:
    """A generate request as every front hands it to a GeneratorModel, not yet checked.

    A front applies its own defaults first (the gRPC front reads top_p 0 as 1.0), so
    `sampling` holds the values meant, in SamplingParams' terms.
    """

    prompt: str
    model: str = ""  # "": the server's default generate model
    version: str = ""  # "": the newest served version
    max_new_tokens: int = 0  # 0: the model's default (Limits.default_new_tokens)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    reject_overlong: bool = False  # a prompt over the token limit is an error, not cut
    request_id: str = ""
    stream_interval: int | None = None  # tokens per message; None: the server's default
    stream_interval_ms: int | None = None  # ms between messages; None: the server's default


@dataclass(frozen=True, slots=True)
class ClassifyItem:
    """One text's result: labels best first."""

    labels: tuple[tuple[str, float], ...]  # (name, probability), best first
    truncated: bool
    input_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateParams:
    """A checked, tokenized generation request as the decoder scheduler sees it."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stream: StreamInterval = field(default_factory=StreamInterval)  # delivery, loop side only


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """What the decoder scheduler yields for one sequence.

    `text` is new, complete text (never a broken multi-byte character, never
    part of a stop string); `finish_reason` is set on the last event only.
    Several tokens may be coalesced into one event when the reader falls behind, or
    as the request's StreamInterval asks; `token_times_us` keeps each token's time.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_times_us: tuple[int, ...] = ()  # per token: µs since the request was queued


class EngineError(Exception):
    """Base of the errors the engine raises; the service maps each to a status."""


class QueueFull(EngineError):
    """The model's queue (or its KV slots and queue) is full: RESOURCE_EXHAUSTED.

    `retry_after_s` is the engine's estimate of when a slot frees up (what it takes to
    work through the queue ahead), sent to the caller as a retry hint."""

    def __init__(self, message: str = "", retry_after_s: float = 0.1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(EngineError):
    """The engine is stopping and takes no new work: UNAVAILABLE."""


class BackendFailure(EngineError):
    """The backend raised while running this request's batch: INTERNAL.

    The message is safe to show a caller (no paths, no traceback); the cause
    is chained for the server's log.
    """


# canonical field -> the name OpenAI's API and the KServe front's parameters give it
SAMPLING_NAMES = {
    "max_new_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.repetition_penalty": "repetition_penalty",
    "sampling.seed": "seed",
}


class InvalidArgument(EngineError):
    """A request field is wrong: INVALID_ARGUMENT (gRPC) with a BadRequest naming `field`.

    `field` is the canonical name (server/calls.py lists them: "texts[3]", "prompt",
    "max_new_tokens", "sampling.temperature", "stop[1]"...) and `message` begins with it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def renamed(self, names: Mapping[str, str]) -> InvalidArgument:
        """The same error in a front's own terms; the message's leading name follows.

        `names` maps canonical names to the front's ("max_new_tokens" -> "max_tokens");
        an index is kept ("stop[1]" -> "stop[1]"). A key "NAME[]" names an element of
        NAME instead, "{}" taking the index ("texts[]" -> "element {}": "element 3").
        """
        head, bracket, rest = self.field.partition("[")
        index = rest.removesuffix("]")
        if bracket and f"{head}[]" in names:
            field = names[f"{head}[]"].format(index)
        elif head in names:
            field = names[head] + (f"[{index}]" if bracket else "")
        else:
            return self
        message = self.message
        if message.startswith(self.field):
            message = field + message[len(self.field) :]
        return InvalidArgument(field, message)

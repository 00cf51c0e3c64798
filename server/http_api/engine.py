"""The HTTP front's calls into the engine: typed requests in, token events and results out.

    async with generator(repository, "tweetgpt") as loaded:         # a lease: not retired meanwhile
        async with generate(loaded, GenerateCall(prompt="hi", ...)) as run:
            async for event in run.events: ...                      # TokenEvent
    model, version, items = await classify(repository, ClassifyCall(texts=("great",)))

The one module of the front that touches the model repository and server/models.py
(GeneratorModel.prepare / generate, ClassifierModel.classify). Field names in the
errors raised here are the engine's (`max_new_tokens`, `sampling.temperature`,
`texts[2]`); openai_wire.py names them as an OpenAI caller knows them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from headrace.server.chat_template import chat_template
from headrace.server.errors import InvalidField
from headrace.server.manifest import MANIFEST_NAME
from headrace.server.repository import LoadedVersion, ModelEntry, ModelRepository
from headrace.server.types import ClassifyItem, SamplingParams, Task, TokenEvent

MAX_TOP_K = 1_000_000  # bound for top_k when the model's vocabulary size is unknown


@dataclass(frozen=True, slots=True)
class GenerateCall:
    """One generation as the engine takes it; 0 / defaults mean "the model's default"."""

    prompt: str
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    reject_overlong: bool = False


@dataclass(frozen=True, slots=True)
class ClassifyCall:
    model: str = ""
    texts: tuple[str, ...] = ()
    top_k: int = 0
    reject_overlong: bool = False


@dataclass
class Generation:
    """A running generation: its events, and what the prompt became."""

    events: AsyncGenerator[TokenEvent, None]
    prompt_tokens: int
    prompt_truncated: bool
    stop: tuple[str, ...] = field(default=())


def _sampling(call: GenerateCall, vocab_size: int | None) -> SamplingParams:
    t = call.temperature
    if math.isnan(t) or not 0.0 <= t <= 100.0:
        raise InvalidField("sampling.temperature", "temperature must be in [0, 100] (0 is greedy)")
    p = call.top_p
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise InvalidField("sampling.top_p", "top_p must be in [0, 1] (0 or 1 turns it off)")
    k_max = vocab_size or MAX_TOP_K
    if not 0 <= call.top_k <= k_max:
        raise InvalidField("sampling.top_k", f"top_k must be in [0, {k_max}] (0 turns it off)")
    rp = call.repetition_penalty
    if math.isnan(rp) or not 0.0 <= rp <= 10.0:
        raise InvalidField(
            "sampling.repetition_penalty",
            "repetition_penalty must be in [0, 10] (0 or 1 turns it off)",
        )
    if call.seed is not None and not 0 <= call.seed < 2**64:
        raise InvalidField("sampling.seed", "seed must be in [0, 2^64)")
    return SamplingParams(
        temperature=float(t),
        top_p=1.0 if p == 0.0 else float(p),
        top_k=call.top_k,
        repetition_penalty=1.0 if rp == 0.0 else float(rp),
        seed=call.seed,
        ignore_eos=call.ignore_eos,
    )


@contextlib.asynccontextmanager
async def generator(repository: ModelRepository, model: str) -> AsyncIterator[LoadedVersion]:
    """The newest version of generate model `model` ("" = the default), leased for the block."""
    async with repository.lease(model, None, Task.GENERATE) as loaded:
        yield loaded


@contextlib.asynccontextmanager
async def generate(loaded: LoadedVersion, call: GenerateCall) -> AsyncIterator[Generation]:
    """Start `call` on `loaded`; leaving the block frees its KV slot at the next step."""
    model: Any = loaded.model
    limits = loaded.manifest.limits
    if call.max_new_tokens > limits.max_new_tokens:
        raise InvalidField(
            "max_new_tokens", f"max_new_tokens must be at most {limits.max_new_tokens}"
        )
    params, truncated = model.prepare(
        call.prompt,
        max_new_tokens=call.max_new_tokens,
        sampling=_sampling(call, getattr(model.backend, "vocab_size", None)),
        stop=call.stop,
        reject_overlong=call.reject_overlong,
    )
    events = model.generate(params)
    try:
        yield Generation(events, len(params.prompt_ids), truncated, call.stop)
    finally:
        await events.aclose()


def chat_prompt(
    loaded: LoadedVersion, messages: Sequence[tuple[str, str]]
) -> tuple[str, tuple[str, ...]]:
    """(role, content) turns -> (prompt, the template's stop strings), by the model's template."""
    return chat_template(loaded.manifest.generation.chat_template).render(messages)


async def classify(
    repository: ModelRepository, call: ClassifyCall
) -> tuple[str, str, list[ClassifyItem]]:
    """-> (model name, version, one item per text)."""
    async with repository.lease(call.model, None, Task.CLASSIFY) as loaded:
        limits = loaded.manifest.limits
        if not call.texts:
            raise InvalidField("texts", "texts must hold at least one text")
        if len(call.texts) > limits.max_texts:
            raise InvalidField(
                "texts", f"at most {limits.max_texts} texts per request, got {len(call.texts)}"
            )
        for i, text in enumerate(call.texts):
            if not text:
                raise InvalidField(f"texts[{i}]", "texts must not be empty")
        if call.top_k < 0:
            raise InvalidField("top_k", "top_k must be >= 0 (0: every label)")
        items = await loaded.model.classify(
            call.texts, top_k=call.top_k, reject_overlong=call.reject_overlong
        )
        return loaded.name, loaded.version, items


def models(repository: ModelRepository) -> list[tuple[ModelEntry, int]]:
    """Every served model with the time its newest version was written (Unix seconds)."""
    out = []
    for entry in repository.list_models():
        newest = repository.versions(entry.name)[0]
        try:
            created = int((newest.path / MANIFEST_NAME).stat().st_mtime)
        except OSError:
            created = 0
        out.append((entry, created))
    return out


def is_ready(repository: ModelRepository) -> bool:
    """Every model the repository serves is started (a version is served only once started)."""
    return bool(repository.names())

"""The HTTP front's calls into the engine: typed calls (server/types.py) in, events and results out.

    async with generator(repository, "tweetgpt") as lease:          # not retired meanwhile
        async with generate(lease.model, GenerateCall(prompt="hi", ...)) as run:
            async for event in run.events: ...                      # TokenEvent
    model, version, items = await classify(repository, ClassifyCall(texts=("great",)))

The one module of the front that touches the model repository and server/models.py
(GeneratorModel.prepare / generate, ClassifierModel.classify). The checks are the
models' own (server/calls.py), the same as for a gRPC call; their errors name the
canonical field (`max_new_tokens`, `sampling.temperature`, `texts[2]`), which the
front renames to the OpenAI parameter (openai_wire.own_names). A scoped API key is
checked here, on the resolved model name, before any work (server/auth.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

from headrace.server import auth
from headrace.server.chat_template import chat_template
from headrace.server.manifest import MANIFEST_NAME
from headrace.server.models import ClassifierModel, GeneratorModel
from headrace.server.repository import Lease, ModelEntry, ModelRepository
from headrace.server.types import ClassifyCall, ClassifyItem, GenerateCall, Task, TokenEvent


@dataclass
class Generation:
    """A running generation: its events, and what the prompt became."""

    events: AsyncGenerator[TokenEvent, None]
    prompt_tokens: int
    prompt_truncated: bool


@contextlib.asynccontextmanager
async def generator(
    repository: ModelRepository, model: str
) -> AsyncIterator[Lease[GeneratorModel]]:
    """The newest version of generate model `model` ("" = the default), leased for the block."""
    auth.authorize_model(model or repository.default_name(Task.GENERATE) or "")
    async with repository.lease(model, None, GeneratorModel) as lease:
        yield lease


@contextlib.asynccontextmanager
async def generate(model: GeneratorModel, call: GenerateCall) -> AsyncIterator[Generation]:
    """Check and start `call`; leaving the block frees its KV slot at the next step."""
    params, truncated = model.prepare(call)
    events = model.generate(params)
    try:
        yield Generation(events, len(params.prompt_ids), truncated)
    finally:
        await events.aclose()


def chat_prompt(
    lease: Lease[GeneratorModel], messages: Sequence[tuple[str, str]]
) -> tuple[str, tuple[str, ...]]:
    """(role, content) turns -> (prompt, the template's stop strings), by the model's template."""
    return chat_template(lease.manifest.generation.chat_template).render(messages)


async def classify(
    repository: ModelRepository, call: ClassifyCall
) -> tuple[str, str, list[ClassifyItem]]:
    """-> (model name, version, one item per text)."""
    auth.authorize_model(call.model or repository.default_name(Task.CLASSIFY) or "")
    async with repository.lease(call.model, None, ClassifierModel) as lease:
        items = await lease.model.classify(call)
        return lease.name, lease.version, items


def models(repository: ModelRepository) -> list[tuple[ModelEntry, int]]:
    """Every model the caller may use, with the time its newest version was written."""
    entries = repository.list_models(ready_only=True)  # OpenAI's list has no state field
    visible = set(auth.allowed_models(e.name for e in entries))
    out = []
    for entry in entries:
        if entry.name not in visible:
            continue
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

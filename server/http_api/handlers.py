"""The routes of the HTTP front: parse (openai_read) -> engine (engine.py) -> write (openai_write).

Each handler is `(front, call, body) -> dict | Response | async iterator of SSE bytes`;
server/http_api/calls.py does the rest (ids, errors, disconnects, the log line).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from headrace.server import auth
from headrace.server.errors import ModelNotFound
from headrace.server.http_api import engine
from headrace.server.http_api import openai_read as read
from headrace.server.http_api import openai_write as wire
from headrace.server.http_api.calls import HttpCall, JSONResponse
from headrace.server.metrics import exposed_registry
from headrace.server.types import TokenEvent
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

if TYPE_CHECKING:
    from headrace.server.http_api.front import HttpFront

# The page is offline by design: nothing may load from elsewhere.
PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
    ),
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
}


# -- models -------------------------------------------------------------------------------------


async def list_models(front: HttpFront, call: HttpCall, body: None) -> dict[str, Any]:
    return wire.models_list(engine.models(front.repository))


async def get_model(front: HttpFront, call: HttpCall, body: None) -> dict[str, Any]:
    name = call.path_params.get("model", "")
    if name in front.repository.names():
        auth.authorize_model(name)  # a key scoped to other models: 403
    for entry, created in engine.models(front.repository):
        if entry.name == name:
            return wire.model_object(entry, created)
    raise ModelNotFound(f"model {name!r} is not served")


# -- generation ---------------------------------------------------------------------------------


async def completions(front: HttpFront, call: HttpCall, body: dict[str, Any]) -> Any:
    return await _generate(front, call, read.read_completion(body, call.request_id))


async def chat_completions(front: HttpFront, call: HttpCall, body: dict[str, Any]) -> Any:
    return await _generate(front, call, read.read_chat(body, call.request_id))


@contextlib.asynccontextmanager
async def _started(
    front: HttpFront, call: HttpCall, parsed: read.GenerationBody
) -> AsyncIterator[tuple[str, engine.Generation]]:
    """The model leased and the generation queued, for the block's duration."""
    async with engine.generator(front.repository, parsed.call.model) as lease:
        call.model, call.model_version = lease.name, lease.version
        request = parsed.call
        if parsed.kind == "chat":
            prompt, turn_stops = engine.chat_prompt(lease, parsed.messages)
            extra = tuple(s for s in turn_stops if s not in request.stop)
            request = replace(request, prompt=prompt, stop=request.stop + extra)
        async with engine.generate(lease.model, request) as run:
            call.prompt_tokens = run.prompt_tokens
            yield lease.name, run


async def _generate(front: HttpFront, call: HttpCall, parsed: read.GenerationBody) -> Any:
    call.body = parsed
    if parsed.stream:
        return _stream(front, call, parsed)
    texts: list[str] = []
    ids: list[int] = []
    last: TokenEvent | None = None
    async with _started(front, call, parsed) as (model, run):
        async for event in run.events:
            texts.append(event.text)
            ids.extend(event.token_ids)
            call.completion_tokens += len(event.token_ids)
            if event.finish_reason is not None:
                last = event
    assert last is not None  # the engine's last event carries the finish reason
    call.prompt_tokens, call.completion_tokens = last.prompt_tokens, last.completion_tokens
    return wire.completion_response(parsed, call.request_id, model, "".join(texts), ids, last)


async def _stream(
    front: HttpFront, call: HttpCall, parsed: read.GenerationBody
) -> AsyncIterator[bytes]:
    async with _started(front, call, parsed) as (model, run):
        chunks = wire.ChunkWriter(
            parsed.kind,
            call.request_id,
            model,
            include_usage=parsed.include_usage,
            token_ids=parsed.return_token_ids,
        )
        async for event in run.events:
            call.completion_tokens += len(event.token_ids)
            data = chunks.event(event)
            if data is not None:
                yield data
            if event.finish_reason is not None:
                call.prompt_tokens = event.prompt_tokens
                call.completion_tokens = event.completion_tokens
                if parsed.include_usage:
                    yield chunks.usage(event.prompt_tokens, event.completion_tokens)
    yield wire.DONE


# -- classify -----------------------------------------------------------------------------------


async def classify(front: HttpFront, call: HttpCall, body: dict[str, Any]) -> dict[str, Any]:
    request = read.read_classify(body, call.request_id)
    model, version, items = await engine.classify(front.repository, request)
    call.model, call.model_version = model, version
    call.prompt_tokens = sum(i.input_tokens for i in items)
    return wire.classify_response(call.request_id, model, version, items)


# -- health, metrics, the page ------------------------------------------------------------------


async def live(front: HttpFront, call: HttpCall, body: None) -> dict[str, Any]:
    return {"status": "live"}


async def ready(front: HttpFront, call: HttpCall, body: None) -> Any:
    if front.accepting() and engine.is_ready(front.repository):
        return {"status": "ready", "models": front.repository.names()}
    state = "draining" if front.draining else "loading" if front.loading else "no_models"
    return JSONResponse({"status": state}, status_code=503)


async def metrics(front: HttpFront, call: HttpCall, body: None) -> Response:
    return Response(generate_latest(exposed_registry()), media_type=CONTENT_TYPE_LATEST)


async def page(front: HttpFront, call: HttpCall, body: None) -> Response:
    return Response(front.page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

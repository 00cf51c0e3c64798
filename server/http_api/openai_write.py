"""The engine's results -> OpenAI's response JSON: bodies, SSE chunks, errors, model objects.

    chunks = ChunkWriter("chat", request_id, model, include_usage=True)
    chunks.event(token_event)  -> b'data: {"object": "chat.completion.chunk", ...}\\n\\n'
    error_body(400, "max_tokens must be ...", "max_tokens")  -> {"error": {...}}

Shapes follow what the `openai` SDK parses: chunks share `id` and `created`;
with `stream_options.include_usage` every chunk carries `usage: null` and one
last chunk with `choices: []` carries the usage; `data: [DONE]` ends a stream.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from headrace.server.http_api.openai_read import GenerationBody, Kind
from headrace.server.repository import ModelEntry
from headrace.server.types import ClassifyItem, FinishReason, TokenEvent

FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _id(kind: Kind, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


class ChunkWriter:
    """The SSE events of one stream: same id and created on every chunk."""

    def __init__(
        self,
        kind: Kind,
        request_id: str,
        model: str,
        *,
        include_usage: bool = False,
        token_ids: bool = False,
    ) -> None:
        self.kind = kind
        self.base: dict[str, Any] = {
            "id": _id(kind, request_id),
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self.include_usage = include_usage
        self.token_ids = token_ids
        self.first = True

    def event(self, event: TokenEvent) -> bytes | None:
        """The chunk for one engine event (None when it carries nothing to send)."""
        finish = None if event.finish_reason is None else FINISH[event.finish_reason]
        if not (event.text or finish or self.first or (self.token_ids and event.token_ids)):
            return None
        choice: dict[str, Any]
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if self.first else {}
            if event.text or self.first:
                delta["content"] = event.text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": finish}
        if self.token_ids:
            choice["token_ids"] = list(event.token_ids)
        self.first = False
        chunk = {**self.base, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})


def completion_response(
    body: GenerationBody,
    request_id: str,
    model: str,
    text: str,
    token_ids: Sequence[int],
    last: TokenEvent,
) -> dict[str, Any]:
    finish = FINISH[last.finish_reason] if last.finish_reason is not None else None
    choice: dict[str, Any]
    if body.kind == "chat":
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if body.return_token_ids:
        choice["token_ids"] = list(token_ids)
    return {
        "id": _id(body.kind, request_id),
        "object": "chat.completion" if body.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(last.prompt_tokens, last.completion_tokens),
    }


def classify_response(
    request_id: str, model: str, version: str, items: Sequence[ClassifyItem]
) -> dict[str, Any]:
    results = [
        {
            "labels": [{"name": n, "score": s} for n, s in item.labels],
            "truncated": item.truncated,
            "input_tokens": item.input_tokens,
        }
        for item in items
    ]
    tokens = sum(i.input_tokens for i in items)
    return {
        "id": f"clf-{request_id}",
        "object": "classification",
        "created": int(time.time()),
        "model": model,
        "model_version": version,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def model_object(entry: ModelEntry, created: int) -> dict[str, Any]:
    """OpenAI's model object, plus what a headrace caller needs (task, labels, limits)."""
    task = entry.task.value if entry.task is not None else ""  # listed entries are ready
    generate = task == "generate"
    return {
        "id": entry.name,
        "object": "model",
        "created": created,
        "owned_by": "headrace",
        "task": task,
        "versions": list(entry.versions),
        "labels": list(entry.labels),
        "backend": entry.backend,
        "precision": entry.precision,
        "is_default": entry.is_default,
        "max_input_tokens": entry.limits.max_input_tokens,
        "max_tokens": entry.limits.max_new_tokens if generate else None,
    }


def models_list(models: Sequence[tuple[ModelEntry, int]]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(e, created) for e, created in models]}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error"
    if status == 429:
        kind = "rate_limit_error"
    elif status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

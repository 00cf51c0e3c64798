"""OpenAI's HTTP API <-> the engine's types: the one place the HTTP front reads and writes JSON.

    body = read_chat(json_object)                 # ChatBody, or InvalidField naming the parameter
    call = generate_call(body, prompt, stop)      # engine.GenerateCall
    chunks = ChunkWriter("chat", request_id, model, include_usage=True)
    chunks.event(token_event)  -> b'data: {"object": "chat.completion.chunk", ...}\\n\\n'

Shapes follow what the `openai` SDK parses: chunks share `id` and `created`;
with `stream_options.include_usage` every chunk carries `usage: null` and one
last chunk with `choices: []` carries the usage; `data: [DONE]` ends a stream.

Parameters OpenAI defines that headrace cannot honour are refused with a 400
naming them (`n` > 1, non-zero `presence_penalty` / `frequency_penalty`,
`logprobs`, tools, ...) rather than ignored; unknown parameters are refused
too (a typo such as `max_token` would otherwise pass silently). Extensions, as
vLLM names them where it has them: `top_k`, `repetition_penalty`, `ignore_eos`,
`return_token_ids` (each choice gets its `token_ids`), and headrace's
`truncate_prompt` (keep the prompt's end instead of refusing an overlong one).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson
from headrace.server.errors import InvalidField
from headrace.server.http_api.engine import ClassifyCall, GenerateCall
from headrace.server.repository import ModelEntry
from headrace.server.types import ClassifyItem, FinishReason, TokenEvent

Kind = Literal["chat", "completion"]
FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}
DONE = b"data: [DONE]\n\n"
OPENAI_TEMPERATURE = 1.0  # OpenAI's default when a request leaves temperature out

# Accepted only with the value that turns them off (the first listed is OpenAI's default).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
_WHY = {
    "n": "n must be 1: headrace returns one choice per request",
    "presence_penalty": "presence_penalty is not supported; use repetition_penalty (a multiplier)",
    "frequency_penalty": "frequency_penalty is not supported; use repetition_penalty (a multiplier)",
}
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
    "top_k", "repetition_penalty", "ignore_eos", "return_token_ids", "truncate_prompt",
    "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
}  # fmt: skip
_KEYS: dict[Kind, set[str]] = {
    "completion": _COMMON | _IGNORED | {"prompt", "echo", "best_of", "suffix"},
    "chat": _COMMON | _IGNORED | set(_NEUTRAL) | {"messages", "max_completion_tokens"},
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class GenerationBody:
    """A parsed /v1/completions or /v1/chat/completions body."""

    kind: Kind
    model: str
    call: GenerateCall  # the prompt is filled in once the chat template is known
    messages: tuple[tuple[str, str], ...] = ()
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    max_tokens_param: str = "max_tokens"  # which name the caller used


# -- reading ------------------------------------------------------------------------------------


def _get(body: Mapping[str, Any], key: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types:
        raise InvalidField(key, f"{key} must be {what}")
    if not isinstance(value, types):
        raise InvalidField(key, f"{key} must be {what}")
    return value


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = _get(body, key, (int, float), "a number")
    return default if value is None else float(value)


def _int(body: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = _get(body, key, (int,), "an integer")
    return default if value is None else int(value)


def _bool(body: Mapping[str, Any], key: str) -> bool:
    return bool(_get(body, key, (bool,), "true or false"))


def _check_keys(body: Mapping[str, Any], kind: Kind) -> None:
    for key in body:
        if key not in _KEYS[kind]:
            raise InvalidField(key, f"unrecognized request argument: {key}")
    for key, allowed in _NEUTRAL.items():
        if key in body and body[key] not in allowed:
            raise InvalidField(key, _WHY.get(key, f"{key} is not supported by headrace"))


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, list):
        raise InvalidField("stop", "stop must be a string or a list of strings")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise InvalidField(f"stop[{i}]", "stop strings must be strings")
    return tuple(stop)


def _read_common(body: Mapping[str, Any], kind: Kind) -> GenerationBody:
    _check_keys(body, kind)
    model = _get(body, "model", (str,), "a string") or ""
    max_param = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_param = "max_completion_tokens"
    max_tokens = _int(body, max_param)
    if max_param in body and body[max_param] is not None and max_tokens < 1:
        raise InvalidField(max_param, f"{max_param} must be at least 1")
    stream = _bool(body, "stream")
    options = _get(body, "stream_options", (dict,), "an object")
    if options is not None and not stream:
        raise InvalidField("stream_options", "stream_options is only allowed with stream: true")
    include_usage = False
    if options:
        unknown = set(options) - {"include_usage", "continuous_usage_stats"}
        if unknown:
            raise InvalidField("stream_options", f"unknown stream_options {sorted(unknown)}")
        include_usage = bool(_get(options, "include_usage", (bool,), "true or false"))
    seed = _get(body, "seed", (int,), "an integer")
    call = GenerateCall(
        prompt="",
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", OPENAI_TEMPERATURE),
        top_p=_number(body, "top_p", 1.0),
        top_k=_int(body, "top_k"),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        seed=seed,
        ignore_eos=_bool(body, "ignore_eos"),
        stop=_stop(body),
        reject_overlong=not _bool(body, "truncate_prompt"),
    )
    return GenerationBody(
        kind=kind,
        model=model,
        call=call,
        stream=stream,
        include_usage=include_usage,
        return_token_ids=_bool(body, "return_token_ids"),
        max_tokens_param=max_param,
    )


def read_completion(body: Mapping[str, Any]) -> GenerationBody:
    parsed = _read_common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        raise InvalidField(
            "prompt", "prompt must be one string (batches and token arrays are not supported)"
        )
    if not isinstance(prompt, str):
        raise InvalidField("prompt", "prompt must be a string")
    return replace(parsed, call=replace(parsed.call, prompt=prompt))


def _content(message: Mapping[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidField(f"{where}.content[{j}]", "only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidField(f"{where}.content[{j}].text", "text must be a string")
            texts.append(text)
        return "".join(texts)
    raise InvalidField(f"{where}.content", "content must be a string or a list of text parts")


def read_chat(body: Mapping[str, Any]) -> GenerationBody:
    parsed = _read_common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidField("messages", "messages must be a non-empty list")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidField(where, "each message must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidField(f"{where}.role", "role must be system, developer, user or assistant")
        turns.append((_ROLES[role], _content(message, where)))
    return replace(parsed, messages=tuple(turns))


def read_classify(body: Mapping[str, Any]) -> ClassifyCall:
    for key in body:
        if key not in {"model", "texts", "top_k", "reject_overlong", "user"}:
            raise InvalidField(key, f"unrecognized request argument: {key}")
    texts = body.get("texts")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise InvalidField("texts", "texts must be a string or a list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidField(f"texts[{i}]", "texts must be strings")
    return ClassifyCall(
        model=_get(body, "model", (str,), "a string") or "",
        texts=tuple(texts),
        top_k=_int(body, "top_k"),
        reject_overlong=_bool(body, "reject_overlong"),
    )


def param_name(field: str | None, body: GenerationBody | None) -> str | None:
    """The OpenAI parameter an engine field name stands for (`sampling.top_p` -> `top_p`)."""
    if field is None:
        return None
    if field.startswith("sampling."):
        return field.removeprefix("sampling.")
    if body is None:
        return field
    if field == "max_new_tokens":
        return body.max_tokens_param
    if field == "prompt" and body.kind == "chat":
        return "messages"
    return field


# -- writing ------------------------------------------------------------------------------------


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
    generate = entry.task.value == "generate"
    return {
        "id": entry.name,
        "object": "model",
        "created": created,
        "owned_by": "headrace",
        "task": entry.task.value,
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

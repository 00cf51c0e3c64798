"""OpenAI's request JSON -> the typed calls every front builds (server/types.py).

    body = read_chat(json_object, request_id)  # GenerationBody; InvalidArgument names the parameter
    body.call                                  # GenerateCall (a chat's prompt: the model's template)
    error.renamed(body.own_names())            # a model check's canonical field -> OpenAI's name

With openai_write.py, the only place the HTTP front knows OpenAI's JSON.
Types and OpenAI's own rules are checked here; ranges and limits are checked by
the model (server/calls.py), the same checks and messages as for a gRPC call.

Parameters OpenAI defines that headrace cannot honour are refused with a 400
naming them (`n` > 1, non-zero `presence_penalty` / `frequency_penalty`,
`logprobs`, tools, ...) rather than ignored; unknown parameters are refused
too (a typo such as `max_token` would otherwise pass silently). Extensions, as
vLLM names them where it has them: `top_k`, `repetition_penalty`, `ignore_eos`,
`return_token_ids` (each choice gets its `token_ids`), and headrace's
`truncate_prompt` (keep the prompt's end instead of refusing an overlong one) and
`stream_interval` / `stream_interval_ms` (tokens / ms per SSE chunk, as on gRPC).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from headrace.server.types import (
    MAX_STREAM_INTERVAL,
    MAX_STREAM_INTERVAL_MS,
    SAMPLING_NAMES,
    ClassifyCall,
    GenerateCall,
    InvalidArgument,
    SamplingParams,
)

Kind = Literal["chat", "completion"]
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
    "stream_interval", "stream_interval_ms", "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
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
    call: GenerateCall  # a chat's prompt is filled in once the model's template is known
    messages: tuple[tuple[str, str], ...] = ()
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    max_tokens_param: str = "max_tokens"  # which name the caller used

    def own_names(self) -> dict[str, str]:
        """Canonical field (server/calls.py) -> the parameter this caller wrote."""
        prompt = "messages" if self.kind == "chat" else "prompt"
        return {**OWN_NAMES, "max_new_tokens": self.max_tokens_param, "prompt": prompt}


# canonical field (server/calls.py) -> OpenAI's parameter; an index is kept (stop[1])
OWN_NAMES = SAMPLING_NAMES


# -- reading ------------------------------------------------------------------------------------


def _get(body: Mapping[str, Any], key: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise InvalidArgument(key, f"{key} must be {what}")
    return value


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = _get(body, key, (int, float), "a number")
    return default if value is None else float(value)


def _int(body: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = _get(body, key, (int,), "an integer")
    return default if value is None else int(value)


def _bool(body: Mapping[str, Any], key: str) -> bool:
    return bool(_get(body, key, (bool,), "true or false"))


def _ranged(body: Mapping[str, Any], key: str, low: int, high: int, unit: str) -> int | None:
    """An optional integer in [low, high] (None when absent); a 400 naming `key` otherwise."""
    value = _get(body, key, (int,), "an integer")
    if value is None:
        return None
    if not low <= value <= high:
        raise InvalidArgument(key, f"{key} must be in [{low}, {high}] {unit}")
    return int(value)


def _check_keys(body: Mapping[str, Any], kind: Kind) -> None:
    for key in body:
        if key not in _KEYS[kind]:
            raise InvalidArgument(key, f"{key} is not a recognized request argument")
    for key, allowed in _NEUTRAL.items():
        if key in body and body[key] not in allowed:
            raise InvalidArgument(key, _WHY.get(key, f"{key} is not supported by headrace"))


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, list):
        raise InvalidArgument("stop", "stop must be a string or a list of strings")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise InvalidArgument(f"stop[{i}]", f"stop[{i}] must be a string")
    return tuple(stop)


def _read_common(body: Mapping[str, Any], kind: Kind) -> GenerationBody:
    _check_keys(body, kind)
    max_param = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_param = "max_completion_tokens"
    max_tokens = _int(body, max_param)
    if body.get(max_param) is not None and max_tokens < 1:
        raise InvalidArgument(max_param, f"{max_param} must be at least 1")
    stream = _bool(body, "stream")
    options = _get(body, "stream_options", (dict,), "an object")
    if options is not None and not stream:
        raise InvalidArgument("stream_options", "stream_options is only allowed with stream: true")
    include_usage = False
    if options:
        unknown = set(options) - {"include_usage", "continuous_usage_stats"}
        if unknown:
            raise InvalidArgument("stream_options", f"stream_options has unknown {sorted(unknown)}")
        include_usage = bool(_get(options, "include_usage", (bool,), "true or false"))
    sampling = SamplingParams(
        temperature=_number(body, "temperature", OPENAI_TEMPERATURE),
        top_p=_number(body, "top_p", 1.0),
        top_k=_int(body, "top_k"),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        seed=_get(body, "seed", (int,), "an integer"),
        ignore_eos=_bool(body, "ignore_eos"),
    )
    call = GenerateCall(
        prompt="",
        model=_get(body, "model", (str,), "a string") or "",
        max_new_tokens=max_tokens,  # 0 (absent): the model's default
        sampling=sampling,
        stop=_stop(body),
        reject_overlong=not _bool(body, "truncate_prompt"),  # OpenAI refuses an overlong prompt
        # tokens / ms per SSE chunk (GenerateRequest's fields); absent: the server's defaults
        stream_interval=_ranged(body, "stream_interval", 1, MAX_STREAM_INTERVAL, "tokens"),
        stream_interval_ms=_ranged(
            body, "stream_interval_ms", 0, MAX_STREAM_INTERVAL_MS, "milliseconds"
        ),
    )
    return GenerationBody(
        kind=kind,
        call=call,
        stream=stream,
        include_usage=include_usage,
        return_token_ids=_bool(body, "return_token_ids"),
        max_tokens_param=max_param,
    )


def read_completion(body: Mapping[str, Any], request_id: str = "") -> GenerationBody:
    parsed = _read_common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        raise InvalidArgument(
            "prompt", "prompt must be one string (batches and token arrays are not supported)"
        )
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt", "prompt must be a string")
    return replace(parsed, call=replace(parsed.call, prompt=prompt, request_id=request_id))


def _content(message: Mapping[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidArgument(at, f"{at} must be a text part (only text is supported)")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidArgument(f"{at}.text", f"{at}.text must be a string")
            texts.append(text)
        return "".join(texts)
    at = f"{where}.content"
    raise InvalidArgument(at, f"{at} must be a string or a list of text parts")


def read_chat(body: Mapping[str, Any], request_id: str = "") -> GenerationBody:
    parsed = _read_common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "messages must be a non-empty list")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidArgument(where, f"{where} must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidArgument(
                f"{where}.role", f"{where}.role must be system, developer, user or assistant"
            )
        turns.append((_ROLES[role], _content(message, where)))
    call = replace(parsed.call, request_id=request_id)
    return replace(parsed, call=call, messages=tuple(turns))


def read_classify(body: Mapping[str, Any], request_id: str = "") -> ClassifyCall:
    for key in body:
        if key not in {"model", "texts", "top_k", "reject_overlong", "user"}:
            raise InvalidArgument(key, f"{key} is not a recognized request argument")
    texts = body.get("texts")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise InvalidArgument("texts", "texts must be a string or a list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidArgument(f"texts[{i}]", f"texts[{i}] must be a string")
    return ClassifyCall(
        texts=tuple(texts),
        model=_get(body, "model", (str,), "a string") or "",
        top_k=_int(body, "top_k"),
        reject_overlong=_bool(body, "reject_overlong"),
        request_id=request_id,
    )

"""OpenAI JSON <-> the typed calls, without a server: parsing, refusals, renames, chunk shapes."""

from __future__ import annotations

import json

import pytest
from headrace.server.calls import check_generate
from headrace.server.http_api import openai_read as read
from headrace.server.http_api import openai_write as wire
from headrace.server.manifest import Limits
from headrace.server.types import FinishReason, InvalidArgument, TokenEvent


def test_defaults_follow_openai() -> None:
    body = read.read_completion({"prompt": "hi"}, "r1")
    call = body.call
    assert (call.prompt, call.max_new_tokens, call.request_id) == ("hi", 0, "r1")
    assert (call.sampling.temperature, call.sampling.top_p) == (1.0, 1.0)
    assert call.reject_overlong and not body.stream and not body.include_usage
    assert read.read_completion({"prompt": ["one"]}).call.prompt == "one"


def test_stream_interval_extension() -> None:
    call = read.read_completion({"prompt": "x", "stream_interval": 8, "stream_interval_ms": 0}).call
    assert (call.stream_interval, call.stream_interval_ms) == (8, 0)
    call = read.read_chat({"messages": [{"role": "user", "content": "x"}]}).call
    assert (call.stream_interval, call.stream_interval_ms) == (None, None)  # the server's


def test_chat_roles_and_content_parts() -> None:
    body = read.read_chat({
        "model": "m",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c", "name": "bot"},
        ],
        "max_completion_tokens": 9,
        "stop": "x",
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "someone",
    })  # fmt: skip
    assert body.messages == (("system", "Be brief."), ("user", "ab"), ("assistant", "c"))
    assert body.call.max_new_tokens == 9 and body.max_tokens_param == "max_completion_tokens"
    assert body.call.stop == ("x",) and body.include_usage


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "frequency_penalty": 1}, "frequency_penalty"),
        ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "stream_interval": 0}, "stream_interval"),
        ({"prompt": "x", "stream_interval": True}, "stream_interval"),
        ({"prompt": "x", "stream_interval_ms": 10_001}, "stream_interval_ms"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
        ({"prompt": "x", "tools": []}, "tools"),  # a chat parameter on /v1/completions
        ({"prompt": "x", "stream": True, "stream_options": {"extra": 1}}, "stream_options"),
    ],
)
def test_refusals_name_the_parameter(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        read.read_completion(body)
    assert info.value.field == param
    assert info.value.message.startswith(param), info.value.message


def _check_error(body: read.GenerationBody, prompt: str = "x") -> InvalidArgument:
    """The model's check (server/calls.py) of `body`'s call, renamed as the front renames it."""
    from dataclasses import replace

    with pytest.raises(InvalidArgument) as info:
        check_generate(replace(body.call, prompt=prompt), Limits(max_new_tokens=64), 100)
    return info.value.renamed(body.own_names())


def test_model_checks_come_back_in_openai_names() -> None:
    chat = read.read_chat(
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 65}
    )
    error = _check_error(chat)
    assert error.field == "max_completion_tokens"
    assert error.message.startswith("max_completion_tokens must be in [0, 64]"), error.message
    assert _check_error(chat, prompt="").field == "messages"
    error = _check_error(read.read_completion({"prompt": "x", "top_p": 1.5}))
    assert (error.field, error.message.split(" ")[0]) == ("top_p", "top_p")
    error = _check_error(read.read_completion({"prompt": "x", "stop": ["a", ""]}))
    assert (error.field, error.message) == ("stop[1]", "stop[1] must not be empty")
    assert _check_error(read.read_completion({"prompt": "x"}), prompt="").field == "prompt"


def _chunk(data: bytes | None) -> dict[str, object]:
    assert data is not None and data.startswith(b"data: ") and data.endswith(b"\n\n")
    return json.loads(data[6:])


def test_chat_chunks() -> None:
    writer = wire.ChunkWriter("chat", "r1", "m", include_usage=True)
    first = _chunk(writer.event(TokenEvent(text="", token_ids=(5,))))
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]  # fmt: skip
    assert first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl-r1"
    assert first["usage"] is None
    assert writer.event(TokenEvent(text="", token_ids=(6,))) is None  # nothing new to show
    end = _chunk(writer.event(TokenEvent("!", (7,), FinishReason.EOS, 3, 3)))
    assert end["choices"][0]["delta"] == {"content": "!"}  # type: ignore[index]
    assert end["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    usage = _chunk(writer.usage(3, 3))
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
    }  # fmt: skip
    assert {first["created"], end["created"], usage["created"]} == {first["created"]}


def test_completion_chunks_with_token_ids() -> None:
    writer = wire.ChunkWriter("completion", "r2", "m", token_ids=True)
    chunk = _chunk(writer.event(TokenEvent(text="", token_ids=(1, 2))))
    assert chunk["object"] == "text_completion" and "usage" not in chunk
    assert chunk["choices"][0] == {  # type: ignore[index]
        "index": 0, "text": "", "logprobs": None, "finish_reason": None, "token_ids": [1, 2],
    }  # fmt: skip
    later = _chunk(writer.event(TokenEvent(text="", token_ids=(3,))))  # counted even without text
    assert later["choices"][0]["token_ids"] == [3]  # type: ignore[index]


def test_error_body() -> None:
    assert wire.error_body(429, "busy", code="queue_full") == {
        "error": {
            "message": "busy",
            "type": "rate_limit_error",
            "param": None,
            "code": "queue_full",
        }
    }
    assert wire.error_body(400, "bad", "top_p")["error"]["type"] == "invalid_request_error"
    assert wire.error_body(503, "later")["error"]["type"] == "server_error"

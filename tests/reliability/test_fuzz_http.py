"""Fuzzed JSON bodies for the OpenAI-style HTTP front: /v1/chat/completions,
/v1/completions, /v1/classify and the model routes.

Known keys with values of every JSON type (NaN and Infinity as Python's json writes
them, integers past 64 bits, unicode with NUL and lone surrogates as JSON escapes),
unknown keys, streaming on and off, bodies that are not JSON. Every answer is 2xx or
4xx, never 5xx, an error body is OpenAI's {"error": {...}} without a traceback, and the
server serves afterwards.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from tests.reliability.conftest import FUZZ, RunningServer
from tests.reliability.test_fuzz_grpc import chars, fields, some_text

# lone surrogates travel in JSON as \ud800 escapes: json.dumps writes them so
loose_text = st.one_of(
    st.text(max_size=12),
    st.text(chars, min_size=100, max_size=1_000),
    st.sampled_from(["", "\x00", "²", "\ud800", "a\udfffb", "\U0001f600" * 20]),
)
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    loose_text,
)
anything = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(loose_text, inner, max_size=4),
    max_leaves=10,
)
generator = st.sampled_from(["tiny-generator", ""])
other_model = st.sampled_from(["tiny-classifier", "tiny-generator", "no-such-model"]) | anything
short = st.text(chars, min_size=1, max_size=8)  # a few tokens: prompts stay within 64
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer"]), "content": short}
)
content_part = st.fixed_dictionaries({"type": st.just("text"), "text": short})

SAMPLING = {
    "max_tokens": (st.integers(1, 6), anything),
    "temperature": (st.sampled_from([0, 0.5]), anything),
    "top_p": (st.sampled_from([1, 0.9]), anything),
    "top_k": (st.integers(0, 4), anything),
    "seed": (st.integers(0, 9), anything),
    "stop": (st.lists(some_text, max_size=2), anything),
    "n": (st.just(1), anything),
    "stream": (st.booleans(), anything),
    "stream_options": (st.just({"include_usage": True}), anything),
    "user": (some_text, anything),
    "logprobs": (st.just(False), anything),
    "frequency_penalty": (st.just(0), anything),
    "repetition_penalty": (st.just(1.0), anything),
}


@st.composite
def chat_body(draw: st.DrawFn) -> Any:
    messages = st.lists(
        message | message.map(lambda m: {**m, "content": [draw(content_part)]}),
        min_size=1,
        max_size=3,
    )
    table = {"model": (generator, other_model), "messages": (messages, anything), **SAMPLING}
    body = fields(draw, table)
    return _extra(draw, body)


@st.composite
def completion_body(draw: st.DrawFn) -> Any:
    prompt = st.one_of(short, st.lists(short, min_size=1, max_size=2))
    body = fields(
        draw, {"model": (generator, other_model), "prompt": (prompt, anything), **SAMPLING}
    )
    return _extra(draw, body)


@st.composite
def classify_body(draw: st.DrawFn) -> Any:
    texts = st.lists(some_text, min_size=1, max_size=3)
    body = fields(
        draw,
        {
            "model": (st.sampled_from(["tiny-classifier", ""]), other_model),
            "texts": (texts, anything),
            "top_k": (st.integers(0, 3), anything),
        },
    )
    return _extra(draw, body)


def _extra(draw: st.DrawFn, body: dict[str, Any]) -> Any:
    body = {k: v for k, v in body.items() if v != "" or k != "model"}
    if body.get("stream_options") == {"include_usage": True} and body.get("stream") is not True:
        del body["stream_options"]  # valid with a stream only
    if draw(st.integers(0, 3)) == 0:  # keys the API does not know
        body.update(draw(st.dictionaries(loose_text, anything, min_size=1, max_size=2)))
    if draw(st.integers(0, 19)) == 0:
        return draw(anything)  # not an object at all
    return body


@pytest.fixture(scope="module")
def base(fuzz_server: RunningServer) -> Iterator[str]:
    yield fuzz_server.http_url
    # still serving: a completion and a classification
    status, _ = post(fuzz_server.http_url, "/v1/completions",
                     {"model": "tiny-generator", "prompt": "the", "max_tokens": 2})  # fmt: skip
    assert status == 200
    status, _ = post(fuzz_server.http_url, "/v1/classify", {"texts": ["still here"]})
    assert status == 200


def post(base: str, path: str, body: Any, raw: bytes | None = None) -> tuple[int, bytes]:
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()  # a stream: every event, to its end
    finally:
        conn.close()


def get(base: str, path: str) -> tuple[int, bytes]:
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def check(status: int, payload: bytes) -> None:
    event(f"{status // 100}xx")
    assert status < 500, (status, payload[:300])
    assert b"Traceback" not in payload and b'File "' not in payload, payload[:300]
    if status >= 400:
        error = json.loads(payload)["error"]
        assert error["message"] and error["type"]


@FUZZ
@given(body=chat_body())
@example(body={"model": "tiny-generator", "messages": [{"role": "user", "content": "\ud800"}]})
@example(body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2**64})
def test_chat_completions(base: str, body: Any) -> None:
    check(*post(base, "/v1/chat/completions", body))


@FUZZ
@given(body=completion_body())
@example(body={"prompt": "the", "temperature": float("nan")})
@example(body={"prompt": "the", "seed": 10**30, "stream": True})
def test_completions(base: str, body: Any) -> None:
    check(*post(base, "/v1/completions", body))


@FUZZ
@given(body=classify_body())
@example(body={"texts": ["a\x00b"], "top_k": -1})
def test_classify(base: str, body: Any) -> None:
    check(*post(base, "/v1/classify", body))


@FUZZ
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/classify"]),
    data=st.binary(max_size=200),
)
@example(path="/v1/completions", data=b'{"prompt": "\xff"}')
@example(path="/v1/completions", data=b'{"prompt": "\\ud800"}')
def test_bodies_that_are_not_json(base: str, path: str, data: bytes) -> None:
    check(*post(base, path, None, raw=data))


@FUZZ
@given(name=st.text(chars, max_size=40))
def test_model_routes(base: str, name: str) -> None:
    check(*get(base, "/v1/models/" + urllib.parse.quote(name, safe="")))

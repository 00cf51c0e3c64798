"""The HTTP front through the real `openai` SDK, against a real server on a real socket."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import RunningServer, add_variant, free_port, scrape

GEN = "long-generator"


@pytest.fixture()
def client(http_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{http_server.http_url}/v1", api_key="unused", max_retries=0, timeout=60
    ) as c:
        yield c


def slots(running: RunningServer, model: str = GEN) -> float | None:
    return scrape(f"{running.http_url}/metrics", "headrace_active_slots", {"model": model})


def test_list_and_retrieve_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny-classifier", GEN}
    assert models[GEN].object == "model" and models[GEN].owned_by == "headrace"
    assert (models[GEN].model_extra or {})["task"] == "generate"
    assert (models["tiny-classifier"].model_extra or {})["labels"] == [
        "negative", "neutral", "positive",
    ]  # fmt: skip
    assert client.models.retrieve(GEN).id == GEN
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion(client: openai.OpenAI) -> None:
    out = client.completions.create(model=GEN, prompt="the service", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.model == GEN
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    again = client.completions.create(model=GEN, prompt="the service", max_tokens=5, temperature=0)
    assert again.choices[0].text == out.choices[0].text  # greedy is deterministic


def test_chat_streams_before_the_end(client: openai.OpenAI, http_server: RunningServer) -> None:
    stream = client.chat.completions.create(
        model=GEN,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_tokens=300,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = []
    for chunk in stream:
        if not chunks:
            # The first chunk is here while the sequence still holds its slot: streamed,
            # not buffered until the end.
            assert slots(http_server) == 1
        chunks.append(chunk)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 10
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 300
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=GEN,
            prompt="the",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert 1 <= chunks[-1].usage.completion_tokens <= 8
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    unary = client.completions.create(model=GEN, prompt="the", max_tokens=8, temperature=0)
    assert text == unary.choices[0].text
    plain = list(client.completions.create(model=GEN, prompt="the", max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain)


def test_stream_interval_sets_tokens_per_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=GEN,
            prompt="the",
            max_tokens=20,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True, "stream_interval": 8},
        )
    )
    sizes = [len((c.choices[0].model_extra or {})["token_ids"]) for c in chunks if c.choices]
    # as on gRPC: 8 tokens a message (more when the reader is behind), the rest last
    assert sum(sizes) == 20 and all(n >= 8 for n in sizes[:-1]) and len(sizes) <= 3, sizes


def test_stop_strings(client: openai.OpenAI) -> None:
    full = client.completions.create(model=GEN, prompt="a stop", max_tokens=40, temperature=0)
    text = full.choices[0].text
    assert len(text) > 12
    stop = text[8:11]
    cut = client.completions.create(
        model=GEN, prompt="a stop", max_tokens=40, temperature=0, stop=[stop, "never-made"]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    single = client.completions.create(
        model=GEN, prompt="a stop", max_tokens=40, temperature=0, stop=stop
    )
    assert single.choices[0].text == cut.choices[0].text


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        out = client.completions.create(
            model=GEN, prompt="the", max_tokens=12, temperature=1.0, seed=seed
        )
        return out.choices[0].text

    assert sample(7) == sample(7)


def test_errors_map_to_sdk_exceptions(client: openai.OpenAI) -> None:
    chat = [{"role": "user", "content": "hi"}]
    cases = [
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"temperature": 500}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"stop": ["x"] * 9}, "stop"),
        ({"extra_body": {"max_token": 5}}, "max_token"),
        ({"extra_body": {"top_k": -1}}, "top_k"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=GEN, messages=chat, **kwargs)  # type: ignore[call-overload]
        assert info.value.status_code == 400
        assert info.value.param == param, (kwargs, info.value.body)
        assert param in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=GEN, messages=[{"role": "tool", "content": "x"}])  # type: ignore[list-item]
    assert info.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=GEN, prompt="word " * 200, max_tokens=2)
    assert info.value.param == "prompt" and "tokens" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=chat)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # a classify model does not generate
        client.completions.create(model="tiny-classifier", prompt="x")
    # a streamed request fails before its first event: a status, not a broken stream
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=GEN, messages=chat, stream=True, n=3)


def test_overlong_prompt_truncated_on_request(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=GEN, prompt="word " * 200, max_tokens=2, extra_body={"truncate_prompt": True}
    )
    assert out.usage is not None and out.usage.prompt_tokens == 64


def test_queue_full_is_429_with_retry_after(start_server, model_repo: Path) -> None:
    add_variant(model_repo, "tiny-generator", "busy", batching={"max_batch": 1, "max_queue": 0})
    running = start_server(model_repo, http_port=free_port())
    with openai.OpenAI(base_url=f"{running.http_url}/v1", api_key="x", max_retries=0) as c:
        hold = c.completions.create(
            model="busy", prompt="the", max_tokens=60, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(hold))  # the one slot is taken
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model="busy", prompt="the", max_tokens=2)
        headers = info.value.response.headers
        assert headers["retry-after"] == "1"  # whole seconds, at least 1
        assert 1 <= int(headers["retry-after-ms"]) <= 60_000  # the queue's own estimate
        assert "queue" in info.value.message
        hold.close()


def test_internal_error_is_500_without_internals(start_server, model_repo: Path) -> None:
    # The manifest promises 400 tokens but the checkpoint has 128 positions: a long text
    # makes the backend fail at call time, as a corrupted artifact would.
    add_variant(model_repo, "tiny-classifier", "broken", limits={"max_input_tokens": 400})
    running = start_server(model_repo, http_port=free_port())
    with openai.OpenAI(base_url=f"{running.http_url}/v1", api_key="x", max_retries=0) as c:

        def classify(text: str) -> object:
            body = {"model": "broken", "texts": [text]}
            return c.post("/classify", cast_to=object, body=body)

        with pytest.raises(openai.InternalServerError) as info:
            classify("word " * 300)
        assert info.value.status_code == 500
        assert "Traceback" not in info.value.message and "/" not in info.value.message
        assert str(model_repo) not in str(info.value.body)
        assert classify("short")  # still serving


def test_drain_refuses_new_requests_and_finishes_streams(start_server, long_models: Path) -> None:
    running = start_server(long_models, http_port=free_port(), grace_period_s=30)
    with openai.OpenAI(base_url=f"{running.http_url}/v1", api_key="x", max_retries=0) as c:
        stream = c.completions.create(
            model=GEN, prompt="the", max_tokens=300, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = [next(iter(stream))]
        stopping = threading.Thread(target=lambda: running.call(lambda: running.server.stop()))
        stopping.start()
        try:
            # until the drain has begun: a request on an open keep-alive connection gets 503 +
            # Connection: close; one whose idle connection the drain closed finds the port
            # shut (refused before anything was sent: as safe to retry elsewhere)
            with pytest.raises((openai.InternalServerError, openai.APIConnectionError)) as info:
                while True:
                    c.models.list()
            if isinstance(info.value, openai.InternalServerError):
                assert info.value.status_code == 503
                assert info.value.response.headers["connection"] == "close"
            # and the port takes no new connection (open ones finish their requests)
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", running.server.http.port), timeout=2)
            chunks.extend(stream)  # the stream in flight runs to its end
        finally:
            stopping.join(60)
    assert chunks[-1].choices[0].finish_reason == "length"

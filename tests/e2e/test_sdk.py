"""The client SDK against a real headrace server serving tiny models over a real socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from headrace.client import (
    AsyncClient,
    ClassifyInput,
    Client,
    FinishReason,
    HealthStatus,
    InvalidArgument,
    NotFound,
    Task,
)

LABELS = {"negative", "neutral", "positive"}
TEXTS = ["I love this, it is great", "this is terrible"]


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    with Client(server.address, timeout=60) as c:
        c.wait_ready(timeout=10)
        yield c


def test_classify(client: Client) -> None:
    result = client.classify(TEXTS, request_id="sdk-c1")
    assert result.model == "tiny-classifier" and result.model_version == "1"
    assert result.request_id == "sdk-c1"
    assert len(result) == 2
    for item in result.results:
        assert {label.name for label in item.labels} == LABELS
        assert sum(label.score for label in item.labels) == pytest.approx(1.0, abs=1e-4)
        scores = [label.score for label in item.labels]
        assert scores == sorted(scores, reverse=True)
        assert item.top == item.labels[0] and item.input_tokens > 0
    assert result.usage.prompt_tokens == sum(r.input_tokens for r in result.results)
    top1 = client.classify("fine", model="tiny-classifier", top_k=1)
    assert len(top1[0].labels) == 1


def test_generate_stream_and_unary_agree(client: Client) -> None:
    result = client.generate("the service answered", max_new_tokens=6, request_id="sdk-g1")
    assert result.model == "tiny-generator" and result.request_id == "sdk-g1"
    assert result.finish_reason in (FinishReason.LENGTH, FinishReason.EOS, FinishReason.STOP)
    assert 0 < result.usage.completion_tokens <= 6
    assert result.usage.prompt_tokens > 0
    chunks = list(client.stream("the service answered", max_new_tokens=6))
    assert "".join(c.text for c in chunks) == result.text  # greedy: the same completion
    assert [t for c in chunks for t in c.token_ids] == list(result.token_ids)
    assert chunks[0].model == "tiny-generator"
    assert chunks[-1].finish_reason is result.finish_reason
    assert chunks[-1].usage == result.usage
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_seeded_sampling_repeats(client: Client) -> None:
    kw: dict[str, Any] = {"max_new_tokens": 8, "temperature": 1.0, "top_k": 50, "seed": 7}
    assert client.generate("streams of", **kw).text == client.generate("streams of", **kw).text


def test_stream_break_leaves_the_server_serving(client: Client) -> None:
    for chunk in client.stream("edge boxes run", max_new_tokens=30):
        assert chunk.request_id
        break
    assert client.generate("edge boxes run", max_new_tokens=2).usage.completion_tokens <= 2


def test_classify_stream(client: Client) -> None:
    items = [ClassifyInput(TEXTS, request_id="cs-a"), "the weather is fine", ["a", "b", "c"]]
    results = list(client.classify_stream(items, top_k=2))
    assert [len(r) for r in results] == [2, 1, 3]
    assert results[0].request_id == "cs-a"
    assert all(len(c.labels) == 2 for r in results for c in r.results)


def test_models_and_health(client: Client) -> None:
    models = {m.name: m for m in client.models()}
    assert {"tiny-classifier", "tiny-generator"} <= set(models)
    classifier = models["tiny-classifier"]
    assert classifier.task is Task.CLASSIFY and classifier.versions == ("1",)
    assert set(classifier.labels) == LABELS and classifier.limits.max_input_tokens > 0
    assert models["tiny-generator"].limits.max_new_tokens > 0
    assert [m.name for m in client.models(Task.GENERATE)] == ["tiny-generator"]
    assert client.health() is HealthStatus.SERVING
    assert client.health("tiny-classifier") is HealthStatus.SERVING
    with pytest.raises(NotFound):
        client.health("no-such-model")


def test_errors_carry_status_and_field(client: Client) -> None:
    with pytest.raises(InvalidArgument) as info:
        client.classify(["fine", ""], request_id="sdk-bad")
    assert info.value.field == "texts[1]"
    assert info.value.request_id == "sdk-bad"
    with pytest.raises(InvalidArgument) as info:
        client.generate("")
    assert info.value.field == "prompt"
    with pytest.raises(InvalidArgument) as info:
        list(client.stream("hello", stop=["ok", ""]))
    assert info.value.field == "stop[1]"
    with pytest.raises(NotFound):
        client.classify("x", model="no-such-model")


def test_async_client(server: Any) -> None:
    async def main() -> None:
        async with AsyncClient(server.address, timeout=60) as c:
            result = await c.classify(TEXTS)
            assert len(result) == 2 and result.model == "tiny-classifier"
            gen = await c.generate("a cancelled call", max_new_tokens=5)
            chunks = [ch async for ch in c.stream("a cancelled call", max_new_tokens=5)]
            assert "".join(ch.text for ch in chunks) == gen.text
            async for _ in c.stream("a cancelled call", max_new_tokens=30):
                break

            async def requests() -> Any:
                for text in TEXTS:
                    yield ClassifyInput(text, request_id=text[:4])

            streamed = [r async for r in c.classify_stream(requests())]
            assert [r.request_id for r in streamed] == [t[:4] for t in TEXTS]
            assert {m.name for m in await c.models()} >= {"tiny-classifier", "tiny-generator"}
            with pytest.raises(InvalidArgument) as info:
                await c.generate("hi", temperature=500.0)
            assert info.value.field == "sampling.temperature"
            results = await asyncio.gather(*(c.classify(f"text {i}") for i in range(8)))
            assert all(len(r) == 1 for r in results)

    asyncio.run(main())


def _tokens_made(name: str) -> float:
    from headrace.server.metrics import REGISTRY

    value = REGISTRY.get_sample_value("headrace_generation_tokens_total", {"model": name})
    return value or 0.0


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def test_abandoned_streams_stop_generation(start_server: Any, long_models: Path) -> None:
    running = start_server(long_models)
    model = running.model("long-generator")

    def made_since(before: float) -> float:
        _wait_for(lambda: model.active_slots == 0)
        time.sleep(0.2)
        return _tokens_made("long-generator") - before

    async def abandon() -> float:
        async with AsyncClient(running.address, timeout=60) as c:
            before = _tokens_made("long-generator")
            async for _ in c.stream("the", model="long-generator", max_new_tokens=400):
                break  # the stream object is dropped here: the SDK cancels the call
            # Measured with the channel still open (closing it would cancel the call too).
            return await asyncio.to_thread(made_since, before)

    made = asyncio.run(abandon())
    assert 0 < made < 300, made  # 400 tokens asked for, generation cut short

    with Client(running.address, timeout=60) as client:
        before = _tokens_made("long-generator")
        with client.stream("the", model="long-generator", max_new_tokens=400) as stream:
            next(stream)
            assert model.active_slots == 1
        assert stream.cancelled
        made = made_since(before)
        assert 0 < made < 300, made
        result = client.generate("the", model="long-generator", max_new_tokens=3)
        assert result.usage.completion_tokens <= 3

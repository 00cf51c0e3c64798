"""Unary calls of Client and AsyncClient against a scripted server over a real socket."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle

import grpc
import pytest
from headrace.client import (
    AsyncClient,
    Classification,
    Client,
    DeadlineExceeded,
    FieldViolation,
    FinishReason,
    HeadraceError,
    HealthStatus,
    InvalidArgument,
    Label,
    ModelLimits,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    Task,
    Unauthenticated,
    Unavailable,
    Usage,
)

from tests.client.conftest import ServerThread


def test_classify_maps_response(server: ServerThread) -> None:
    with Client(server.address) as client:
        result = client.classify(["good", "a rather long text"], top_k=2, request_id="r-1")
    assert result.model == "tiny" and result.model_version == "3"
    assert result.request_id == "r-1"
    assert len(result) == 2
    first = result[0]
    assert isinstance(first, Classification)
    assert first.labels == (
        Label("positive", pytest.approx(0.5)),
        Label("neutral", pytest.approx(0.3)),
    )
    assert first.top.name == "positive"
    assert first.truncated is False and result[1].truncated is True
    assert result.usage == Usage(prompt_tokens=4 + 11, completion_tokens=0)
    sent = server.record.requests[-1]
    assert list(sent.texts) == ["good", "a rather long text"] and sent.top_k == 2


def test_classify_single_string_is_one_text(server: ServerThread) -> None:
    with Client(server.address) as client:
        result = client.classify("hello", model="tiny", version="2", reject_overlong=True)
    sent = server.record.requests[-1]
    assert list(sent.texts) == ["hello"]
    assert sent.model_version == "2" and sent.reject_overlong is True
    assert result.model_version == "2" and result.request_id == "srv-made"
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.model = "x"  # type: ignore[misc]


def test_generate_maps_request_and_response(server: ServerThread) -> None:
    with Client(server.address) as client:
        result = client.generate(
            "hi there",
            model="gen",
            max_new_tokens=7,
            temperature=0.7,
            top_p=0.9,
            top_k=5,
            repetition_penalty=1.2,
            seed=42,
            stop=["\n", "."],
            request_id="g-1",
        )
    sent = server.record.requests[-1]
    assert sent.prompt == "hi there" and sent.max_new_tokens == 7
    assert sent.sampling.temperature == pytest.approx(0.7)
    assert sent.sampling.top_p == pytest.approx(0.9) and sent.sampling.top_k == 5
    assert sent.sampling.repetition_penalty == pytest.approx(1.2)
    assert sent.sampling.HasField("seed") and sent.sampling.seed == 42
    assert list(sent.stop) == ["\n", "."]
    assert result.text == "HI THERE"
    assert result.token_ids == tuple(ord(c) for c in "HI THERE")
    assert result.finish_reason is FinishReason.STOP
    assert result.usage == Usage(prompt_tokens=8, completion_tokens=8)
    assert result.request_id == "g-1" and result.prompt_truncated is False


def test_generate_without_seed_leaves_it_unset(server: ServerThread) -> None:
    with Client(server.address) as client:
        result = client.generate("abc", stop="x")
    sent = server.record.requests[-1]
    assert not sent.sampling.HasField("seed")
    assert list(sent.stop) == ["x"]
    assert result.finish_reason is FinishReason.STOP


def test_models(server: ServerThread) -> None:
    with Client(server.address) as client:
        every = client.models()
        generators = client.models(task="generate")
    assert [m.name for m in every] == ["tiny", "gen"]
    tiny = every[0]
    assert tiny.task is Task.CLASSIFY and tiny.versions == ("3", "2")
    assert tiny.latest_version == "3" and tiny.is_default
    assert tiny.labels == ("negative", "neutral", "positive")
    assert tiny.limits == ModelLimits(max_input_tokens=128, max_texts=64, max_batch=32)
    assert (tiny.backend, tiny.profile, tiny.precision, tiny.device) == (
        "onnxruntime",
        "edge",
        "int8",
        "cpu",
    )
    assert [m.name for m in generators] == ["gen"] and generators[0].task is Task.GENERATE


def test_health(server: ServerThread) -> None:
    with Client(server.address) as client:
        assert client.health() is HealthStatus.SERVING
        assert client.health("headrace.v1.Inference") is HealthStatus.SERVING
        with pytest.raises(NotFound):
            client.health("no-such-model")


def test_invalid_argument_carries_field_and_details(server: ServerThread) -> None:
    with Client(server.address) as client, pytest.raises(InvalidArgument) as info:
        client.classify(["a", ""], model="bad", request_id="mine")
    err = info.value
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details == "texts[1] must not be empty"
    assert err.field == "texts[1]"
    assert err.field_violations == (FieldViolation("texts[1]", "texts[1] must not be empty"),)
    assert err.request_id == "srv-req-7"  # the server's RequestInfo wins over ours
    assert err.reason == "EMPTY_TEXT"
    assert isinstance(err.__cause__, grpc.RpcError)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is InvalidArgument and again.field == "texts[1]"


@pytest.mark.parametrize(
    ("model", "exc", "code"),
    [
        ("missing", NotFound, grpc.StatusCode.NOT_FOUND),
        ("busy", ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("aborted", HeadraceError, grpc.StatusCode.ABORTED),
    ],
)
def test_status_codes_map_to_exceptions(
    server: ServerThread, model: str, exc: type[HeadraceError], code: grpc.StatusCode
) -> None:
    with Client(server.address) as client, pytest.raises(HeadraceError) as info:
        client.generate("p", model=model, request_id="mine")
    assert type(info.value) is exc
    assert info.value.code is code
    assert info.value.field is None
    assert info.value.request_id == "mine"  # the server sent none: the caller's id
    if model == "busy":
        assert info.value.retry_after == pytest.approx(0.25)


def test_metadata_client_wide_and_per_call(server: ServerThread) -> None:
    with Client(server.address, metadata={"authorization": "Bearer good"}) as client:
        client.classify("x", model="auth", metadata=[("x-trace", "t-9")])
        md = server.record.metadata[-1]
        assert md["authorization"] == "Bearer good" and md["x-trace"] == "t-9"
    with Client(server.address, metadata={"authorization": "Bearer bad"}) as client:
        with pytest.raises(Unauthenticated):
            client.classify("x", model="auth")


def test_api_key_goes_with_every_call(server: ServerThread) -> None:
    with Client(server.address, api_key="good", metadata={"x-trace": "t-1"}) as client:
        client.classify("x", model="auth")
        assert server.record.metadata[-1]["authorization"] == "Bearer good"
        assert "good" not in repr(client) and "good" not in repr(client._settings)
        for chunk in client.stream("ab"):
            assert chunk is not None
        assert server.record.metadata[-1]["authorization"] == "Bearer good"
    with Client(server.address, api_key="bad") as client, pytest.raises(Unauthenticated):
        client.classify("x", model="auth")

    async def main() -> None:
        async with AsyncClient(server.address, api_key="good") as c:
            await c.classify("x", model="auth")
            assert server.record.metadata[-1]["authorization"] == "Bearer good"

    asyncio.run(main())
    for bad in ["", "two words", "clé"]:
        with pytest.raises(ValueError, match="api_key"):
            Client(server.address, api_key=bad)
    with pytest.raises(ValueError, match="not both"):
        Client(server.address, api_key="good", metadata={"authorization": "Bearer other"})


def test_timeouts_default_and_per_call(server: ServerThread) -> None:
    with Client(server.address, timeout=0.2) as client:
        with pytest.raises(DeadlineExceeded):
            client.classify("x", model="slow")
        assert client.classify("x", model="slow", timeout=5.0).model == "slow"
    with Client(server.address) as client, pytest.raises(DeadlineExceeded):
        client.generate("x", model="slow", timeout=0.1)


def test_retry_policy_retries_unavailable(fresh_server: ServerThread) -> None:
    fast = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    with Client(fresh_server.address, retry=fast) as client:
        result = client.classify("x", model="flaky", request_id="r-retry")
    assert result.request_id == "r-retry"
    assert fresh_server.record.attempts["r-retry"] == 2
    # gRPC tells the server which attempt this is.
    assert fresh_server.record.metadata[-1].get("grpc-previous-rpc-attempts") == "1"


def test_retry_gives_up_after_max_attempts(fresh_server: ServerThread) -> None:
    fast = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
    with Client(fresh_server.address, retry=fast) as client, pytest.raises(Unavailable):
        client.classify("x", model="down", request_id="r-down")
    assert fresh_server.record.attempts["r-down"] == 4


def test_no_retry_without_policy(fresh_server: ServerThread) -> None:
    with Client(fresh_server.address, retry=None) as client, pytest.raises(Unavailable):
        client.classify("x", model="flaky", request_id="r-once")
    assert fresh_server.record.attempts["r-once"] == 1
    with Client(fresh_server.address, retry=None) as client, pytest.raises(Unavailable):
        client.generate("x", model="flaky", request_id="g-once")
    assert fresh_server.record.attempts["g-once"] == 1


def test_generate_refused_before_it_ran_is_retried(fresh_server: ServerThread) -> None:
    # seeded or not: the refused attempt sent nothing back, so a retry is as good
    fast = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    with Client(fresh_server.address, retry=fast) as client:
        assert client.generate("ab", model="flaky", request_id="g-retry").text == "AB"
        assert "".join(c.text for c in client.stream("ab", model="flaky", request_id="s-r"))
    assert fresh_server.record.attempts["g-retry"] == 2
    assert fresh_server.record.attempts["s-r"] == 2


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", retry=None) as client, pytest.raises(Unavailable):
        client.classify("x", timeout=5)
    with Client("127.0.0.1:1") as client, pytest.raises(Unavailable):
        client.wait_ready(timeout=0.2)


def test_async_unary_calls(server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncClient(server.address, metadata={"authorization": "Bearer good"}) as c:
            await c.wait_ready(timeout=5)
            result = await c.classify(["good"], model="auth", request_id="a-1")
            assert result.request_id == "a-1" and result.results[0].top.name == "positive"
            gen = await c.generate("abc", seed=1)
            assert gen.text == "ABC" and gen.finish_reason is FinishReason.LENGTH
            assert [m.name for m in await c.models(Task.CLASSIFY)] == ["tiny"]
            assert await c.health() is HealthStatus.SERVING
            with pytest.raises(InvalidArgument) as info:
                await c.classify(["a", ""], model="bad")
            assert info.value.field == "texts[1]"
            with pytest.raises(DeadlineExceeded):
                await c.classify("x", model="slow", timeout=0.1)
            with pytest.raises(NotFound):
                await c.generate("x", model="missing")

    asyncio.run(main())


def test_async_retry(fresh_server: ServerThread) -> None:
    async def main() -> None:
        fast = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)
        async with AsyncClient(fresh_server.address, retry=fast) as c:
            await c.classify("x", model="flaky", request_id="a-retry")

    asyncio.run(main())
    assert fresh_server.record.attempts["a-retry"] == 2


def test_given_channel_is_used_and_left_open(server: ServerThread) -> None:
    channel = grpc.insecure_channel(server.address)
    with Client(channel=channel) as client:
        assert client.classify("x").model == "tiny"
    # Still open: the client did not own it.
    with Client(channel=channel) as client:
        assert client.classify("x").model == "tiny"
    channel.close()

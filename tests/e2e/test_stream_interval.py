"""Tokens per GenerateStream message: stream_interval (tokens), stream_interval_ms, a reader
that falls behind, per-token times; over a real server, a tiny real generator, real sockets."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from headrace.client import Client
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.e2e.conftest import RunningServer, bad_request_field, free_port

GEN = "long-generator"
TOKENS = 24


@pytest.fixture(scope="module")
def running(long_models: Path) -> Iterator[RunningServer]:
    from tests.e2e.conftest import make_config

    server = RunningServer(make_config(long_models))
    yield server
    server.stop()


@pytest.fixture()
def stub(running: RunningServer) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(running.address) as channel:
        yield pb_grpc.InferenceStub(channel)


def request(max_new_tokens: int = TOKENS, **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=GEN,
        prompt="the service answered",
        max_new_tokens=max_new_tokens,
        sampling=pb.SamplingParams(ignore_eos=True),
        **fields,
    )


def ids(chunks: list[pb.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@pytest.mark.parametrize("interval", [2, 5, 8, TOKENS, 100])
def test_interval_of_n_tokens(stub: pb_grpc.InferenceStub, interval: int) -> None:
    one = list(stub.GenerateStream(request(stream_interval=1)))
    chunks = list(stub.GenerateStream(request(stream_interval=interval)))
    assert ids(chunks) == ids(one) and len(ids(one)) == TOKENS  # every token, in order
    assert "".join(c.text for c in chunks) == "".join(c.text for c in one)
    # each message waits for `interval` tokens (more when the reader fell behind): at most
    # ceil(tokens / interval) messages, exactly that when every token was taken in time
    assert all(len(c.token_ids) >= interval for c in chunks[:-1])
    assert len(chunks) <= math.ceil(TOKENS / interval)
    if interval >= TOKENS:
        assert len(chunks) == 1
    assert chunks[-1].finish_reason == pb.LENGTH and chunks[-1].usage.completion_tokens == TOKENS
    assert chunks[0].model == GEN


def test_token_times_per_token(stub: pb_grpc.InferenceStub, running: RunningServer) -> None:
    start = time.perf_counter()
    chunks = list(stub.GenerateStream(request(stream_interval=5)))
    elapsed_us = (time.perf_counter() - start) * 1e6
    assert all(len(c.token_times_us) == len(c.token_ids) for c in chunks)
    times = [t for c in chunks for t in c.token_times_us]
    assert times == sorted(times) and 0 < times[0] and times[-1] < elapsed_us
    # the SDK surfaces them
    with Client(running.address, timeout=60) as client:
        sdk = list(client.stream("the service answered", model=GEN, max_new_tokens=6,
                                 ignore_eos=True, stream_interval=3))  # fmt: skip
    assert [len(c.token_times_us) for c in sdk] == [len(c.token_ids) for c in sdk]
    assert sum(len(c.token_ids) for c in sdk) == 6 and len(sdk) <= 2


def test_interval_in_milliseconds(stub: pb_grpc.InferenceStub) -> None:
    n = 300
    one = list(stub.GenerateStream(request(n, stream_interval=1)))
    chunks = list(stub.GenerateStream(request(n, stream_interval_ms=25)))
    assert ids(chunks) == ids(one) and "".join(c.text for c in chunks) == "".join(
        c.text for c in one
    )
    took_ms = chunks[-1].token_times_us[-1] / 1000
    # the first message at once, then at most one per 25 ms, the last on the finish
    assert len(chunks) <= took_ms / 25 + 2, (len(chunks), took_ms)
    assert len(chunks) < n // 4
    assert len(chunks[0].token_ids) < 5  # the first did not wait for the interval


def test_out_of_range_values_are_invalid_argument(stub: pb_grpc.InferenceStub) -> None:
    for fields, name in (
        ({"stream_interval": 4097}, "stream_interval"),
        ({"stream_interval_ms": 10_001}, "stream_interval_ms"),
    ):
        for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
            with pytest.raises(grpc.RpcError) as info:
                call(request(**fields))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad_request_field(info.value) == name
            assert name in (info.value.details() or "")
    # the bounds themselves are fine
    chunks = list(stub.GenerateStream(request(4, stream_interval=4096, stream_interval_ms=0)))
    assert len(chunks) == 1 and len(chunks[0].token_ids) == 4


def test_slow_reader_gets_fewer_larger_messages(running: RunningServer) -> None:
    # A small receive window, as a slow link has: the server's writes wait for the reader,
    # and what is made meanwhile goes in one message.
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    n = 300
    with grpc.insecure_channel(running.address, options=options) as channel:
        stub = pb_grpc.InferenceStub(channel)
        fast = list(stub.GenerateStream(request(n, stream_interval=1)))
        slow: list[pb.GenerateChunk] = []
        for chunk in stub.GenerateStream(request(n, stream_interval=1)):
            slow.append(chunk)
            time.sleep(0.02)
    assert ids(slow) == ids(fast) and len(ids(slow)) == n
    assert "".join(c.text for c in slow) == "".join(c.text for c in fast)
    assert len(slow) < n // 3, len(slow)  # one message per token would be 300
    assert max(len(c.token_ids) for c in slow) > 5


def test_server_default_and_override(start_server: Any, long_models: Path) -> None:
    server = start_server(long_models, stream_interval=4, http_port=free_port())
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        default = list(stub.GenerateStream(request(12)))
        assert all(len(c.token_ids) >= 4 for c in default[:-1]) and len(default) <= 3
        own = list(stub.GenerateStream(request(12, stream_interval=1, stream_interval_ms=0)))
        assert ids(own) == ids(default)
    # the OpenAI front streams the same text with the server's default interval
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0) as client:
        whole = client.completions.create(
            model=GEN, prompt="the service answered", max_tokens=12, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        stream = client.completions.create(
            model=GEN, prompt="the service answered", max_tokens=12, temperature=0,
            stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        pieces = [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].text == "".join(c.text for c in default)
    assert len([p for p in pieces if p]) <= 3

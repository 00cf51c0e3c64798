"""Past the queue bound, on every front: each call ends OK or "retry later"
(RESOURCE_EXHAUSTED / HTTP 429), none CANCELLED by the server, none hangs.

tests/e2e/test_admission.py covers unary Classify at 3x a queue of 16 with its retry
hints; here: generation streams, the HTTP front, and (slow) the issue's own scale,
3x a queue of 1,024 on one channel, where grpc core's pending-call limit once cancelled
602 of 3,000 calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import time
from pathlib import Path

import grpc
import pytest
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.e2e.conftest import add_variant
from tests.reliability.conftest import free_port

OK, FULL = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
SLOTS, QUEUE = 2, 6  # the generator variant's KV slots and queue: a bound of 8


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


async def _streams(address: str, calls: int) -> list[grpc.StatusCode]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        sampling = pb.SamplingParams(ignore_eos=True)
        request = pb.GenerateRequest(
            model="narrow", prompt="the", max_new_tokens=24, sampling=sampling
        )

        async def one() -> grpc.StatusCode:
            try:
                chunks = [chunk async for chunk in stub.GenerateStream(request, timeout=60)]
            except grpc.aio.AioRpcError as err:
                return err.code()
            assert chunks[-1].usage.completion_tokens == 24
            return OK

        async with asyncio.timeout(90):  # none hangs
            return await asyncio.gather(*(one() for _ in range(calls)))


def test_generation_streams_at_three_times_the_bound(start_server, model_repo: Path) -> None:
    add_variant(
        model_repo, "tiny-generator", "narrow", batching={"max_batch": SLOTS, "max_queue": QUEUE}
    )
    running = start_server(model_repo)
    codes = asyncio.run(_streams(running.address, 3 * (SLOTS + QUEUE)))
    assert set(codes) <= {OK, FULL}, codes
    assert codes.count(OK) >= SLOTS + QUEUE and FULL in codes
    model = running.model("narrow")
    wait_for(lambda: model.active_slots == 0)


def _post(port: int, body: dict) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"}
        )
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def test_http_completions_at_three_times_the_bound(start_server, model_repo: Path) -> None:
    add_variant(
        model_repo, "tiny-generator", "narrow", batching={"max_batch": SLOTS, "max_queue": QUEUE}
    )
    running = start_server(model_repo, http_port=free_port())
    port = int(running.http_url.rsplit(":", 1)[1])
    body = {"model": "narrow", "prompt": "the", "max_tokens": 24, "ignore_eos": True}
    calls = 3 * (SLOTS + QUEUE)
    with concurrent.futures.ThreadPoolExecutor(calls) as pool:
        answers = list(pool.map(lambda _: _post(port, body), range(calls), timeout=90))
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses and 429 in statuses
    for status, headers in answers:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1


async def _classify_storm(address: str, calls: int) -> list[grpc.StatusCode]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.ClassifyRequest(model="queue-1024", texts=["a b c d e f g"])

        async def one() -> grpc.StatusCode:
            try:
                await stub.Classify(request, timeout=120)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return OK

        async with asyncio.timeout(180):
            return await asyncio.gather(*(one() for _ in range(calls)))


@pytest.mark.slow
def test_unary_classify_at_three_times_a_queue_of_1024(start_server, model_repo: Path) -> None:
    add_variant(
        model_repo, "tiny-classifier", "queue-1024", batching={"max_queue": 1024, "max_batch": 4}
    )
    running = start_server(model_repo)
    codes = asyncio.run(_classify_storm(running.address, 3 * 1024))
    assert set(codes) <= {OK, FULL}, {c: codes.count(c) for c in set(codes)}
    assert OK in codes

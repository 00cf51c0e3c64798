"""Admission past the queue bound: RESOURCE_EXHAUSTED from our code with a retry hint,
never a transport reset; the SDK waits the hint and retries."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from headrace.client import Client, ResourceExhausted, RetryPolicy
from headrace.server.transport import server_options
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.e2e.conftest import add_variant

QUEUE = 16  # the test model's queue bound: 3x of it is quick to run


def _trailers(err: grpc.aio.AioRpcError) -> dict[str, str | bytes]:
    return dict(err.trailing_metadata() or ())


async def _storm(address: str, calls: int) -> list[tuple[grpc.StatusCode, dict]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.ClassifyRequest(model="narrow", texts=["a b c d e f g"] * 4)

        async def one() -> tuple[grpc.StatusCode, dict]:
            try:
                await stub.Classify(request, timeout=60)
            except grpc.aio.AioRpcError as err:
                return err.code(), _trailers(err)
            return grpc.StatusCode.OK, {}

        return await asyncio.gather(*(one() for _ in range(calls)))


def test_three_times_the_queue_bound_ends_ok_or_resource_exhausted_with_a_hint(
    start_server, model_repo: Path
) -> None:
    add_variant(
        model_repo, "tiny-classifier", "narrow", batching={"max_queue": QUEUE, "max_batch": 1}
    )
    running = start_server(model_repo)
    results = asyncio.run(_storm(running.address, 3 * QUEUE))
    codes = [code for code, _ in results]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    for code, trailers in results:
        if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            continue
        hint = int(trailers["retry-after-ms"])
        assert 10 <= hint <= 10_000
        assert trailers["grpc-retry-pushback-ms"] == trailers["retry-after-ms"]
        assert trailers["x-request-id"]
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry)
        assert retry.retry_delay.ToMilliseconds() == hint
    # and the server is fine afterwards
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert stub.Classify(pb.ClassifyRequest(model="narrow", texts=["ok"]), timeout=30)


def test_transport_limits_leave_admission_to_the_server() -> None:
    options = dict(server_options(1 << 20, max_connection_age_s=300, grace_period_s=15))
    # grpc core's defaults (1,000 / 3,000 pending calls) cancelled a burst of 3,000 calls
    assert options["grpc.server.max_pending_requests"] >= 100_000
    assert options["grpc.server.max_pending_requests_hard_limit"] >= 100_000
    # the SDK's keepalive pings are allowed; a client is never sent away for its pings
    assert options["grpc.http2.max_ping_strikes"] == 0
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= 10_000
    assert options["grpc.max_connection_age_grace_ms"] == 15_000
    assert "grpc.max_connection_age_ms" not in dict(server_options(1 << 20))


@pytest.mark.parametrize("seed", [None, 7])
def test_sdk_retries_a_full_queue_after_the_hint(start_server, model_repo: Path, seed) -> None:
    # one slot, no queue: of 3 concurrent calls 2 are refused at first
    add_variant(model_repo, "tiny-generator", "one-slot", batching={"max_batch": 1, "max_queue": 0})
    running = start_server(model_repo)
    patient = RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.5)

    def generate(client: Client) -> str:
        return client.generate("the service", model="one-slot", max_new_tokens=8, seed=seed).text

    with Client(running.address, retry=None, timeout=60) as client:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            outcomes = [pool.submit(generate, client) for _ in range(3)]
            errors = [f.exception() for f in outcomes]
    refused = [e for e in errors if e is not None]
    assert refused and all(isinstance(e, ResourceExhausted) for e in refused)
    assert all(e.retry_after is not None and e.retry_after > 0 for e in refused)  # type: ignore[union-attr]

    # two callers for one slot: the refused one has four more tries, each after the hint
    # (three callers can collide again on a loaded box and run out of gRPC's five attempts)
    with Client(running.address, retry=patient, timeout=60) as client:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            texts = list(pool.map(lambda _: generate(client), range(2)))
    assert len(texts) == 2


def test_a_queued_stream_has_its_headers_before_its_first_token(
    start_server, long_models: Path, tmp_path: Path
) -> None:
    # Headers leave once the request is queued (they overlap the prefill): a stream waiting
    # for the only slot has its request id while the slot's holder still decodes.
    repo = tmp_path / "models"
    shutil.copytree(long_models, repo)
    add_variant(repo, "long-generator", "one-slot", batching={"max_batch": 1, "max_queue": 1})
    add_variant(repo, "long-generator", "no-queue", batching={"max_batch": 1, "max_queue": 0})
    running = start_server(repo)

    def request(model: str, n: int) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(ignore_eos=True)
        return pb.GenerateRequest(model=model, prompt="the", max_new_tokens=n, sampling=sampling)

    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        holder = stub.GenerateStream(request("one-slot", 400), timeout=60)
        next(holder)  # it holds the slot for its 400 tokens
        start = time.perf_counter()
        queued = stub.GenerateStream(request("one-slot", 4), timeout=60)
        headers = dict(queued.initial_metadata())
        waited_s = time.perf_counter() - start
        assert len(str(headers["x-request-id"])) == 32
        chunks = list(queued)
        assert sum(len(c.token_ids) for c in chunks) == 4
        assert chunks[0].request_id == headers["x-request-id"]
        # its first token came once the holder was done (µs since it was queued), its
        # headers long before that
        assert waited_s < chunks[0].token_times_us[0] / 1e6 / 2, (waited_s, chunks[0])
        list(holder)
        # refused at the queue: trailers only (gRPC's retry policy may retry it)
        busy = stub.GenerateStream(request("no-queue", 400), timeout=60)
        next(busy)
        refused = stub.GenerateStream(request("no-queue", 4), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            list(refused)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not refused.initial_metadata()
        assert dict(refused.trailing_metadata())["x-request-id"]
        busy.cancel()

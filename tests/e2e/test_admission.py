"""Admission past the queue bound: RESOURCE_EXHAUSTED from our code with a retry hint,
never a transport reset; the SDK waits the hint and retries."""

from __future__ import annotations

import asyncio
import concurrent.futures
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

"""1,000 generation streams cancelled by their callers (before the first token, after it,
a few tokens in): every KV slot comes back, and the process does not grow."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import grpc
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

STREAMS = 1_000
AT_ONCE = 8  # the long generator's KV slots: cancelled streams make room for the next ones
RSS_GROWTH_LIMIT = 20 * 2**20


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def cancel_streams(address: str, count: int) -> dict[str, int]:
    """Start `count` 400-token streams, AT_ONCE at a time, and cancel each early."""
    seen = {"before_first": 0, "after_first": 0, "a_few_in": 0}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(
            model="long-generator", prompt="the", max_new_tokens=400,
            sampling=pb.SamplingParams(ignore_eos=True),
        )  # fmt: skip

        async def one(i: int) -> None:
            call = stub.GenerateStream(request, timeout=60)
            kind = ("before_first", "after_first", "a_few_in")[i % 3]
            if kind == "after_first":
                await call.read()
            elif kind == "a_few_in":
                for _ in range(3):
                    await call.read()
            else:
                await asyncio.sleep(0)
            call.cancel()
            assert await call.code() == grpc.StatusCode.CANCELLED
            seen[kind] += 1

        for start in range(0, count, AT_ONCE):
            await asyncio.gather(*(one(i) for i in range(start, min(start + AT_ONCE, count))))
    return seen


def test_a_thousand_cancelled_streams_free_their_slots_and_memory(
    start_server, long_models: Path
) -> None:
    running = start_server(long_models)
    model = running.model("long-generator")
    asyncio.run(cancel_streams(running.address, 100))  # warm: sessions, caches, channels
    gc.collect()
    before = rss_bytes()
    seen = asyncio.run(cancel_streams(running.address, STREAMS))
    assert sum(seen.values()) == STREAMS
    end = time.monotonic() + 20
    while model.active_slots:
        assert time.monotonic() < end, f"{model.active_slots} slots still held"
        time.sleep(0.02)
    gc.collect()
    growth = rss_bytes() - before
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB"
    with grpc.insecure_channel(running.address) as channel:  # the slots serve again
        out = pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(model="long-generator", prompt="the", max_new_tokens=3), timeout=30
        )
        assert 1 <= out.usage.completion_tokens <= 3

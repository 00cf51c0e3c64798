"""Soak: 100,000 Classify calls from 64 concurrent callers against `headrace serve`, 0 errors.

Deselected by default (marker `soak`, pyproject addopts); run it with `make soak`
(`pytest -m soak tests/reliability -s`). SOAK_CALLS and SOAK_CALLERS change the load.
It prints one line: calls, errors by code, seconds, calls/s, the server's RSS growth."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.soak, pytest.mark.timeout(3600)]

CALLS = int(os.environ.get("SOAK_CALLS", "100000"))
CALLERS = int(os.environ.get("SOAK_CALLERS", "64"))
CHANNELS = 4  # callers share a few connections, as an SDK's pool would


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def soak(address: str, calls: int, callers: int) -> Counter[str]:
    codes: Counter[str] = Counter()
    left = iter(range(calls))
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    try:
        stubs = [pb_grpc.InferenceStub(c) for c in channels]

        async def caller(n: int) -> None:
            stub = stubs[n % CHANNELS]
            for i in left:
                request = pb.ClassifyRequest(texts=[f"soak text number {i}"], top_k=1)
                try:
                    out = await stub.Classify(request, timeout=60)
                    assert len(out.results) == 1
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1

        await asyncio.gather(*(caller(n) for n in range(callers)))
    finally:
        for c in channels:
            await c.close()
    return codes


def test_soak_classify(tiny_models: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "headrace.server", "serve", "--models", str(tiny_models),
         "--port", "0", "--port-file", str(port_file), "--poll-interval", "0",
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        end = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < end, "server did not start"
            time.sleep(0.05)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        asyncio.run(soak(address, 2_000, CALLERS))  # warm
        rss_before = rss_kib(proc.pid)
        t0 = time.perf_counter()
        codes = asyncio.run(soak(address, CALLS, CALLERS))
        seconds = time.perf_counter() - t0
        growth_mib = (rss_kib(proc.pid) - rss_before) / 1024
        errors = sum(n for code, n in codes.items() if code != "OK")
        print(
            f"\nsoak: {CALLS} Classify calls, {CALLERS} callers: {errors} errors "
            f"{dict(codes)}, {seconds:.1f} s, {CALLS / seconds:.0f} calls/s, "
            f"server RSS growth {growth_mib:+.1f} MiB"
        )
        assert codes["OK"] == CALLS, dict(codes)
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

"""The load generator: one process, asyncio + grpc.aio (uvloop when present), raw stubs.

    python -m bench.loadgen classify --target 127.0.0.1:50051 --model sentiment \
        --concurrency 1,4,16,64 --duration 10 --out points.json
    python -m bench.loadgen classify --protocol kserve ...     # headrace's KServe v2 front
    python -m bench.loadgen classify --protocol mlserver ...   # Seldon MLServer (KServe v2)
    python -m bench.loadgen generate --target ... --concurrency 1,4,16 --new-tokens 64 ...
    python -m bench.loadgen cancel --target ... --streams 1000 --concurrency 64 ...

It is kept light because on a 2-core machine it competes with the server for CPU:
requests are serialized once before the run and sent as bytes (no per-call protobuf
work), classify responses are not parsed (the status code is checked), and stream
chunks are parsed only for their token ids. N callers each keep exactly one request in
flight (closed loop); a point runs `warmup` seconds unmeasured, then `duration` seconds
measured: throughput counts the calls (or tokens) that completed inside the window, and
latencies are those of the calls that ended (TTFT: whose first token came) inside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.common import (
    PROMPTS,
    latency_summary,
    pct,
    run_and_write,
    thread_cpu,
    thread_cpu_delta,
    tweets,
)

CLASSIFY = "/headrace.v1.Inference/Classify"
GENERATE_STREAM = "/headrace.v1.Inference/GenerateStream"
KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
METHODS = {"headrace": CLASSIFY, "kserve": KSERVE_INFER, "mlserver": KSERVE_INFER}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # One HTTP/2 connection carries every caller, as one client process would.
    ("grpc.http2.max_pings_without_data", 0),
]


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of `pid` and its children (MLServer forks workers)."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


class Window:
    """The measured window of one point, and CPU use of both sides inside it."""

    def __init__(self, warmup: float, duration: float, server_pid: int | None) -> None:
        now = time.perf_counter()
        self.start = now + warmup
        self.end = self.start + duration
        self.duration = duration
        self.server_pid = server_pid
        self.cpu: dict[str, Any] = {}

    def inside(self, t: float) -> bool:
        return self.start <= t <= self.end

    async def watch(self) -> None:
        me = psutil.Process(os.getpid())
        await asyncio.sleep(max(0.0, self.start - time.perf_counter()))
        s0, c0 = _cpu_seconds(self.server_pid), sum(me.cpu_times()[:2])
        t0 = thread_cpu(self.server_pid) if self.server_pid else {}
        await asyncio.sleep(max(0.0, self.end - time.perf_counter()))
        s1, c1 = _cpu_seconds(self.server_pid), sum(me.cpu_times()[:2])
        t1 = thread_cpu(self.server_pid) if self.server_pid else {}
        # CPU seconds of the server's main process per thread group (bench/common.thread_group)
        self.cpu["server_threads_s"] = {g: round(s, 3) for g, s in thread_cpu_delta(t0, t1).items()}
        # Cores busy on average: 1.0 is one core fully used for the whole window.
        self.cpu["server_cores"] = (
            (s1 - s0) / self.duration if s0 is not None and s1 is not None else None
        )
        self.cpu["client_cores"] = (c1 - c0) / self.duration


def classify_payloads(protocol: str, model: str, n: int) -> list[bytes]:
    texts = tweets(n, seed=2)
    if protocol == "headrace":
        from headrace.v1 import inference_pb2 as pb

        return [pb.ClassifyRequest(model=model, texts=[t]).SerializeToString() for t in texts]
    from bench import kserve

    if protocol == "kserve":
        return [kserve.headrace_request(model, [t]).SerializeToString() for t in texts]
    return [kserve.mlserver_request(model, t).SerializeToString() for t in texts]


async def classify_point(
    channel: grpc.aio.Channel,
    method: str,
    payloads: list[bytes],
    concurrency: int,
    warmup: float,
    duration: float,
    server_pid: int | None,
    call_timeout: float,
) -> dict[str, Any]:
    call = channel.unary_unary(method)  # bytes in, bytes out: no (de)serialization
    window = Window(warmup, duration, server_pid)
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def caller(k: int) -> None:
        i = k
        while time.perf_counter() < window.end:
            t0 = time.perf_counter()
            try:
                await call(payloads[i % len(payloads)], timeout=call_timeout)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            finally:
                i += concurrency
            t1 = time.perf_counter()
            if window.inside(t1):
                latencies.append(t1 - t0)

    watcher = asyncio.create_task(window.watch())
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    await watcher
    return {
        "concurrency": concurrency,
        "throughput": len(latencies) / duration,
        **latency_summary(latencies),
        "errors": dict(errors),
        **window.cpu,
    }


# Greedy with ignore_eos: every stream carries exactly `new_tokens` tokens, as the raw
# limit decodes every slot for all its steps (greedy decoding of the demo tweet model
# would otherwise reach its end-of-text token after about 4 tokens).


def generate_payloads(
    model: str, new_tokens: int, stream_interval: int = 0, stream_interval_ms: int | None = None
) -> list[bytes]:
    """Serialized GenerateRequests; `stream_interval*` as the request fields (None: unset)."""
    from headrace.v1 import inference_pb2 as pb

    return [
        pb.GenerateRequest(
            model=model,
            prompt=p,
            max_new_tokens=new_tokens,
            sampling=pb.SamplingParams(ignore_eos=True),
            stream_interval=stream_interval,
            stream_interval_ms=stream_interval_ms,
        ).SerializeToString()
        for p in PROMPTS
    ]


class StreamStats:
    """The figures of one generate point, shared by the gRPC and the SSE load generators:
    tokens received inside the window, TTFT, ITL (per token, between token-bearing
    chunks) and TPOT (per stream)."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.tokens_in_window = 0
        self.messages_in_window = 0  # token-bearing chunks: several tokens may share one
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.completions: list[int] = []
        self.tpot: list[float] = []
        self.errors: Counter[str] = Counter()

    def stream(self, t0: float) -> Stream:
        return Stream(self, t0)

    def point(self, concurrency: int) -> dict[str, Any]:
        ttft_s = latency_summary(self.ttft)
        gaps, tpot, completions = self.gaps, self.tpot, self.completions
        return {
            "concurrency": concurrency,
            "tokens_per_s": self.tokens_in_window / self.window.duration,
            "messages_per_s": self.messages_in_window / self.window.duration,
            "ttft_p50_ms": ttft_s["p50_ms"],
            "ttft_p99_ms": ttft_s["p99_ms"],
            "itl_p50_ms": None if not gaps else round(1e3 * (pct(gaps, 50) or 0.0), 3),
            "itl_p99_ms": None if not gaps else round(1e3 * (pct(gaps, 99) or 0.0), 3),
            "tpot_p50_ms": None if not tpot else round(1e3 * (pct(tpot, 50) or 0.0), 3),
            "tpot_p99_ms": None if not tpot else round(1e3 * (pct(tpot, 99) or 0.0), 3),
            "streams_completed": len(completions),
            "mean_tokens_per_stream": (sum(completions) / len(completions))
            if completions
            else None,
            "errors": dict(self.errors),
            **self.window.cpu,
        }


class Stream:
    """One stream's timing: `chunk()` per token-bearing chunk, `done()` at its end."""

    __slots__ = ("first", "n", "n_first", "prev", "stats", "t0")

    def __init__(self, stats: StreamStats, t0: float) -> None:
        self.stats, self.t0 = stats, t0
        self.prev: float | None = None
        self.first: float | None = None
        self.n = self.n_first = 0

    def chunk(self, t: float, got: int) -> bool:
        """Record `got` tokens received at `t`; True when the window is over (stop the stream)."""
        stats = self.stats
        if self.first is None:
            self.first, self.n_first = t, got
        self.n += got
        if stats.window.inside(t):
            stats.tokens_in_window += got
            stats.messages_in_window += 1
            if self.prev is None:
                stats.ttft.append(t - self.t0)
            else:
                stats.gaps.extend([(t - self.prev) / got] * got)
        self.prev = t
        return t > stats.window.end

    def done(self) -> None:
        stats, first, prev = self.stats, self.first, self.prev
        if first is not None and prev is not None and self.n > self.n_first:
            if stats.window.inside(first):
                stats.tpot.append((prev - first) / (self.n - self.n_first))
        if stats.window.inside(time.perf_counter()):
            stats.completions.append(self.n)


async def generate_point(
    channel: grpc.aio.Channel,
    payloads: list[bytes],
    concurrency: int,
    warmup: float,
    duration: float,
    server_pid: int | None,
    call_timeout: float,
) -> dict[str, Any]:
    from headrace.v1 import inference_pb2 as pb

    stream = channel.unary_stream(
        GENERATE_STREAM, response_deserializer=pb.GenerateChunk.FromString
    )
    window = Window(warmup, duration, server_pid)
    stats = StreamStats(window)

    async def caller(k: int) -> None:
        i = k
        while time.perf_counter() < window.end:
            payload = payloads[i % len(payloads)]
            i += concurrency
            track = stats.stream(time.perf_counter())
            call = stream(payload, timeout=call_timeout)
            try:
                async for chunk in call:
                    got = len(chunk.token_ids)
                    if got and track.chunk(time.perf_counter(), got):
                        call.cancel()  # the window is over: stop this stream
                        break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    stats.errors[exc.code().name] += 1
                continue
            track.done()

    watcher = asyncio.create_task(window.watch())
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    await watcher
    return stats.point(concurrency)


async def cancel_run(
    channel: grpc.aio.Channel,
    model: str,
    streams: int,
    concurrency: int,
    new_tokens: int,
    call_timeout: float,
) -> dict[str, Any]:
    """`streams` GenerateStreams, each cancelled after 1-6 tokens (some before their first)."""
    from headrace.v1 import inference_pb2 as pb

    stream = channel.unary_stream(
        GENERATE_STREAM, response_deserializer=pb.GenerateChunk.FromString
    )
    payloads = generate_payloads(model, new_tokens)
    rng = random.Random(0)
    plan = [rng.randint(0, 6) for _ in range(streams)]  # tokens to read before cancelling
    outcome: Counter[str] = Counter()
    queue = list(range(streams))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            call = stream(payloads[i % len(payloads)], timeout=call_timeout)
            want, got = plan[i], 0
            try:
                if want == 0:
                    await asyncio.sleep(0.001 * rng.random())  # cancel while queued or in prefill
                    call.cancel()
                    outcome["cancelled_after_0"] += 1
                    continue
                async for chunk in call:
                    got += len(chunk.token_ids)
                    if got >= want:
                        call.cancel()
                        outcome["cancelled_after_1-6"] += 1
                        break
                else:
                    outcome["finished_before_cancel"] += 1  # EOS came first
            except grpc.aio.AioRpcError as exc:
                outcome[exc.code().name] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "streams": streams,
        "concurrency": concurrency,
        "new_tokens": new_tokens,
        "seconds": time.perf_counter() - t0,
        "outcome": dict(outcome),
    }


async def _main(a: argparse.Namespace) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(a.target, options=CHANNEL_OPTIONS)
    await asyncio.wait_for(channel.channel_ready(), 30)
    points = []
    try:
        if a.mode == "cancel":
            return await cancel_run(
                channel, a.model, a.streams, a.concurrency[0], a.new_tokens, a.timeout
            )
        if a.mode == "classify":
            payloads = classify_payloads(a.protocol, a.model, 512)
            method = METHODS[a.protocol]
            for c in a.concurrency:
                point = await classify_point(
                    channel, method, payloads, c, a.warmup, a.duration, a.server_pid, a.timeout
                )
                print(
                    f"  classify c={c:3d} {point['throughput']:8.1f} req/s  "
                    f"p50 {point['p50_ms']} ms  p99 {point['p99_ms']} ms  err {point['errors']}",
                    flush=True,
                )
                points.append(point)
        else:
            payloads = generate_payloads(
                a.model, a.new_tokens, a.stream_interval, a.stream_interval_ms
            )
            for c in a.concurrency:
                point = await generate_point(
                    channel, payloads, c, a.warmup, a.duration, a.server_pid, a.timeout
                )
                print(
                    f"  generate c={c:3d} {point['tokens_per_s']:8.1f} tok/s  "
                    f"{point['messages_per_s']:8.1f} msg/s  "
                    f"ttft p50 {point['ttft_p50_ms']} ms  itl p50 {point['itl_p50_ms']} ms  "
                    f"err {point['errors']}",
                    flush=True,
                )
                points.append(point)
    finally:
        await channel.close()
    return {"points": points}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("mode", choices=["classify", "generate", "cancel"])
    p.add_argument("--target", required=True)
    p.add_argument("--protocol", choices=sorted(METHODS), default="headrace")
    p.add_argument("--model", default="")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--stream-interval", type=int, default=0, help="tokens per message (0: server's)")
    p.add_argument("--stream-interval-ms", type=int, default=None, help="ms between messages")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of one call, seconds")
    p.add_argument("--server-pid", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    run_and_write(_main(a), a.out)


if __name__ == "__main__":
    main()

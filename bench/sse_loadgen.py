"""The SSE load generator: the generate point of bench/loadgen.py, over headrace's HTTP front.

    python -m bench.sse_loadgen --target 127.0.0.1:8000 --model tweetgpt \
        --concurrency 1,16 --new-tokens 64 --duration 10 --out points.json

Same closed loop, same prompts, same window and the same figures as
`bench.loadgen generate`, so the two doors compare side by side: N callers each
keep one `POST /v1/completions` with `stream: true` in flight (greedy,
`ignore_eos`, `return_token_ids` so tokens are counted as gRPC counts them).
It is kept as light as the gRPC one: raw asyncio streams on keep-alive
connections (one per caller, as an SDK's pool holds), request bytes built
before the run, chunked transfer decoded by hand, each event parsed by orjson
for its token ids only. A stream still running at the window's end is closed
(the connection dropped, as a client that goes away does).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import PROMPTS, run_and_write
from bench.loadgen import StreamStats, Window


def payloads(host: str, model: str, new_tokens: int) -> list[bytes]:
    out = []
    for prompt in PROMPTS:
        body = orjson.dumps({
            "model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "return_token_ids": True,
        })  # fmt: skip
        head = (
            f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


class Connection:
    """One keep-alive HTTP/1.1 connection reading a chunked SSE response."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> int:
        """Send one request -> its HTTP status (headers read)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1])

    async def events(self) -> Any:
        """The JSON of each `data:` event until [DONE] (the chunked body's end)."""
        assert self.reader is not None
        buffer = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await self.reader.readexactly(2)
                return
            buffer += (await self.reader.readexactly(size + 2))[:-2]
            while (end := buffer.find(b"\n\n")) >= 0:
                event, buffer = buffer[:end], buffer[end + 2 :]
                if event.startswith(b"data: ") and event != b"data: [DONE]":
                    yield orjson.loads(event[6:])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def generate_point(
    host: str,
    port: int,
    requests: list[bytes],
    concurrency: int,
    warmup: float,
    duration: float,
    server_pid: int | None,
) -> dict[str, Any]:
    window = Window(warmup, duration, server_pid)
    stats = StreamStats(window)

    async def caller(k: int) -> None:
        conn = Connection(host, port)
        i = k
        while time.perf_counter() < window.end:
            request = requests[i % len(requests)]
            i += concurrency
            track = stats.stream(time.perf_counter())
            try:
                status = await conn.send(request)
                if status != 200:
                    stats.errors[str(status)] += 1
                    conn.close()
                    continue
                async for chunk in conn.events():
                    if "error" in chunk:
                        stats.errors[str(chunk["error"].get("code"))] += 1
                        conn.close()
                        break
                    choices = chunk["choices"]
                    got = len(choices[0].get("token_ids") or ()) if choices else 0
                    if got and track.chunk(time.perf_counter(), got):
                        conn.close()  # the window is over: drop this stream
                        break
            except (OSError, asyncio.IncompleteReadError) as exc:
                stats.errors[type(exc).__name__] += 1
                conn.close()
                continue
            track.done()
        conn.close()

    watcher = asyncio.create_task(window.watch())
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    await watcher
    return stats.point(concurrency)


async def _main(a: argparse.Namespace) -> dict[str, Any]:
    host, port = a.target.rsplit(":", 1)
    requests = payloads(host, a.model, a.new_tokens)
    points = []
    for c in a.concurrency:
        point = await generate_point(
            host, int(port), requests, c, a.warmup, a.duration, a.server_pid
        )
        print(
            f"  sse      c={c:3d} {point['tokens_per_s']:8.1f} tok/s  "
            f"ttft p50 {point['ttft_p50_ms']} ms  itl p50 {point['itl_p50_ms']} ms  "
            f"err {point['errors']}",
            flush=True,
        )
        points.append(point)
    return {"points": points}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--target", required=True, help="host:port of the HTTP front")
    p.add_argument("--model", default="")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--server-pid", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    run_and_write(_main(a), a.out)


if __name__ == "__main__":
    main()

"""Latency of one unary Classify through the client SDK vs. the same model called in-process.

    python bench/sdk_overhead.py                 # tiny-classifier, 500 calls per path
    python bench/sdk_overhead.py --models DIR --model NAME --n 1000 --text "..."

Paths, each sequential (one call in flight), same text, same model version:

  backend        backend.forward(ids, mask) on pre-tokenized input (numpy in, logits out)
  engine         ClassifierModel.classify(call) awaited on the server's event loop:
                 tokenize + EncoderBatcher + backend + softmax, no gRPC
  grpc-stub      the generated stub over localhost, no SDK
  sdk-sync       headrace.client.Client.classify
  sdk-async      headrace.client.AsyncClient.classify

The gRPC paths call a server in a subprocess (`headrace serve`), so client and
server do not share a GIL; the in-process paths load the same folder in this
process. Rounds are interleaved (every path once per round, in a shuffled
order) so that load from other processes spreads over all paths alike. Prints p50 / p90 / p99 in µs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from headrace.client import AsyncClient, Client
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc


def percentiles(lat_s: list[float]) -> dict[str, float]:
    us = np.asarray(lat_s) * 1e6
    return {
        "p50": float(np.percentile(us, 50)),
        "p90": float(np.percentile(us, 90)),
        "p99": float(np.percentile(us, 99)),
        "mean": float(statistics.fmean(us)),
    }


class LoopThread:
    """An event loop in a daemon thread; `time(fn)` measures one awaited call on that loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    def time(self, fn: Callable[[], Awaitable[Any]]) -> float:
        async def once() -> float:
            t0 = time.perf_counter()
            await fn()
            return time.perf_counter() - t0

        result: float = self.run(once())
        return result

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def time_sync(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def start_server(models: Path, workdir: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port_file = workdir / "port"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "headrace.server", "serve", "--models", str(models),
            "--port", "0", "--port-file", str(port_file), "--poll-interval", "0",
            "--log-level", "warning", "--intra-op-threads", str(threads),
            "--inter-op-threads", "1",
        ],
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def measure(
    models: Path, address: str, name: str, text: str, n: int, warmup: int, threads: int
) -> dict[str, list[float]]:
    """Interleaved: each round calls every path once, so load changes hit all paths alike."""
    from headrace.server.app import Server
    from headrace.server.config import ServerConfig
    from headrace.server.models import ClassifierModel
    from headrace.server.types import ClassifyCall

    engine_loop, client_loop = LoopThread(), LoopThread()
    config = ServerConfig(
        models=models, port=0, poll_interval_s=0.0, intra_op_threads=threads, inter_op_threads=1
    )
    server = Server(config.validate())
    engine_loop.run(server.start())
    channel = grpc.insecure_channel(address)
    client = Client(address, timeout=30)
    aclient: AsyncClient = client_loop.run(_make_async_client(address))
    try:
        model = server.repository.get(name, None, ClassifierModel)
        call = ClassifyCall(texts=(text,))
        if "torch" in sys.modules:
            # OpenMP thread counts are per calling thread: match the engine's worker here.
            sys.modules["torch"].set_num_threads(threads)
        ids = np.asarray([model.encode([text])[0][0]], dtype=np.int64)  # [1, T]
        mask = np.ones_like(ids)  # [1, T]
        stub = pb_grpc.InferenceStub(channel)
        request = pb.ClassifyRequest(model=name, texts=[text])
        served = next(m for m in client.models() if m.name == name)
        print(
            f"in-process backend: {type(model.backend).__name__}; served backend: "
            f"{served.backend} ({served.precision}, {served.device}); tokens: {ids.shape[1]}"
        )
        paths: dict[str, Callable[[], float]] = {
            "backend": lambda: time_sync(lambda: model.backend.forward(ids, mask)),
            "engine": lambda: engine_loop.time(lambda: model.classify(call)),
            "grpc-stub": lambda: time_sync(lambda: stub.Classify(request, timeout=30)),
            "sdk-sync": lambda: time_sync(lambda: client.classify(text, model=name)),
            "sdk-async": lambda: client_loop.time(lambda: aclient.classify(text, model=name)),
        }
        out: dict[str, list[float]] = {path: [] for path in paths}
        order = list(paths)
        rng = random.Random(0)
        for i in range(warmup + n):
            rng.shuffle(order)  # no path always runs right after another
            for path in order:
                latency = paths[path]()
                if i >= warmup:
                    out[path].append(latency)
        return out
    finally:
        client.close()
        channel.close()
        client_loop.run(aclient.close())
        engine_loop.run(server.stop(0))
        engine_loop.close()
        client_loop.close()


async def _make_async_client(address: str) -> AsyncClient:
    return AsyncClient(address, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="model repository (default: build tiny models)")
    parser.add_argument("--model", default="tiny-classifier")
    parser.add_argument("--text", default="I love this, it is great and wonderful")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="backend intra-op threads, in-process and in the server (default 1: idle "
        "spinning OpenMP threads of one side would otherwise steal the other's CPU)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = args.models
        if models is None:
            from headrace.build.tiny import make_tiny_classifier

            models = workdir / "models"
            make_tiny_classifier(models / "tiny-classifier" / "1")
        proc, address = start_server(models, workdir, args.threads)
        try:
            results = measure(
                models, address, args.model, args.text, args.n, args.warmup, args.threads
            )
        finally:
            proc.terminate()
            proc.wait(30)

    print(f"\nmodel {args.model}, {args.n} sequential calls per path (latency in µs)")
    print(f"{'path':<12}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}")
    for path, lat in results.items():
        p = percentiles(lat)
        print(f"{path:<12}{p['p50']:>10.0f}{p['p90']:>10.0f}{p['p99']:>10.0f}{p['mean']:>10.0f}")
    sdk, stub = statistics.median(results["sdk-sync"]), statistics.median(results["grpc-stub"])
    print(f"\nsdk-sync minus grpc-stub (p50): {(sdk - stub) * 1e6:+.0f} µs")
    print(f"SDK mapping alone (request + response + settings), p50: {mapping_cost():.1f} µs")


def mapping_cost(n: int = 20000) -> float:
    """What the SDK adds around the stub call, without the network: build the request,
    merge call settings, map the response to dataclasses (3 labels, one text)."""
    from headrace.client import _convert
    from headrace.client._channel import settings

    s = settings(
        "127.0.0.1:1", tls=False, root_certificates=None, client_cert=None, client_key=None,
        server_name_override=None, metadata={"authorization": "Bearer x"}, timeout=30.0,
        retry=None, load_balancing="round_robin", keepalive_time=None, keepalive_timeout=20.0,
        keepalive_permit_without_calls=False, max_message_bytes=None, wait_for_ready=None,
        compression=None, user_agent=None, options=(),
    )  # fmt: skip
    labels = [pb.Label(name=n, score=v) for n, v in (("positive", 0.7), ("neutral", 0.2))]
    response = pb.ClassifyResponse(
        model="m", model_version="1", request_id="r", usage=pb.Usage(prompt_tokens=11),
        results=[pb.Classification(labels=[*labels, pb.Label(name="negative", score=0.1)])],
    )  # fmt: skip

    def once() -> None:
        _convert.classify_request(
            "text", model="m", version="", top_k=0, request_id=None, reject_overlong=False
        )
        s.call_timeout(None)
        s.call_metadata(None)
        _convert.classify_result(response)

    lat = [time_sync(once) for _ in range(n)]
    return statistics.median(lat) * 1e6


if __name__ == "__main__":
    main()

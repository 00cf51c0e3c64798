"""Overload: N x the queue bound of unary Classify calls at once, counted by status code.

    python -m bench.overload                       # tiny classifier, queue bound 1024, 3x
    python -m bench.overload --queue 256 --factor 3 --channels 1 --out bench/results/overload.json
    python -m bench.overload --queue 256 --bare    # + the same storm on a server refusing all

A `headrace serve` child process serves a copy of a tiny classifier whose manifest sets
`batching.max_queue` to `--queue`; one grpc.aio client (one channel unless `--channels`)
starts `factor * queue` Classify calls at once and waits for all of them. Reported per
status code: the count and latency percentiles (ms, from the call's start to its
status), and whether RESOURCE_EXHAUSTED answers carried `retry-after-ms`. What admission
must give: every call OK or RESOURCE_EXHAUSTED, none CANCELLED or UNAVAILABLE.

With `--bare`, bench/bare_server.py `--reject` (a grpc.aio server that refuses every
call with RESOURCE_EXHAUSTED at once: the transport alone) runs beside it and the
rounds alternate between the two, so both meet the same box; a refusal's latency
under the burst is read against that floor. Printed last: each code's p99, the
median over the measured rounds (all but the first), per server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import grpc

from bench.common import latency_summary, write_json
from bench.servers import ServerProcess, channel_ready, free_port

RETRY_AFTER_KEY = "retry-after-ms"


def prepare_repo(root: Path, queue: int, max_batch: int) -> Path:
    """A repository with one tiny classifier (torch artifact) of queue bound `queue`."""
    from headrace.build.tiny import make_tiny_classifier

    version = root / "tiny-classifier" / "1"
    path = version / "headrace.json"
    if not path.exists():
        shutil.rmtree(version, ignore_errors=True)
        make_tiny_classifier(version)
    manifest = json.loads(path.read_text())
    manifest.setdefault("batching", {}).update(max_queue=queue, max_batch=max_batch)
    path.write_text(json.dumps(manifest))
    return root


async def storm(target: str, calls: int, channels: int, text: str) -> dict[str, Any]:
    from headrace.v1 import inference_pb2 as pb
    from headrace.v1 import inference_pb2_grpc as pbg

    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    for ch in chans:
        await ch.channel_ready()
    stubs = [pbg.InferenceStub(ch) for ch in chans]
    latencies: dict[str, list[float]] = defaultdict(list)
    hinted = Counter[str]()
    messages: dict[str, str] = {}

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        call = stubs[i % channels].Classify(
            pb.ClassifyRequest(model="tiny-classifier", texts=[text]), timeout=60
        )
        try:
            await call
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
            messages.setdefault(code, err.details() or "")
            if any(k == RETRY_AFTER_KEY for k, _ in err.trailing_metadata() or ()):
                hinted[code] += 1
        latencies[code].append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    wall = time.perf_counter() - t0
    for ch in chans:
        await ch.close()
    return {
        "calls": calls,
        "wall_s": round(wall, 3),
        "codes": {code: len(v) for code, v in sorted(latencies.items())},
        "latency": {code: latency_summary(v) for code, v in sorted(latencies.items())},
        "retry_hint": dict(hinted),
        "messages": messages,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queue", type=int, default=1024, help="the model's batching.max_queue")
    ap.add_argument("--factor", type=float, default=3.0, help="calls = factor x queue")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="the first round is a warm-up")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep the tiny model here (reused)")
    ap.add_argument("--bare", action="store_true", help="also a bare server refusing every call")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "port").unlink(missing_ok=True)
        repo = prepare_repo(work / "models", a.queue, a.max_batch)
        port_file = work / "port"
        cmd = [
            sys.executable, "-m", "headrace.server", "serve", "--models", str(repo),
            "--profile", "cpu", "--port", "0", "--port-file", str(port_file),
            "--poll-interval", "0", "--log-level", "error", "--intra-op-threads", "1",
        ]  # fmt: skip
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(ServerProcess("headrace", cmd, work / "server.log"))
            server.wait_ready(port_file.exists, timeout=120)
            target = f"127.0.0.1:{int(port_file.read_text())}"
            server.wait_ready(lambda: channel_ready(target), timeout=60)
            targets = {"headrace": target}
            if a.bare:  # up beside it: the rounds alternate, so both see the same box
                port = free_port()
                bare_cmd = [sys.executable, "-m", "bench.bare_server", "--port", str(port),
                            "--reject"]  # fmt: skip
                bare = stack.enter_context(ServerProcess("bare", bare_cmd, work / "bare.log"))
                targets["bare_reject"] = f"127.0.0.1:{port}"
                bare.wait_ready(lambda: channel_ready(targets["bare_reject"]), timeout=60)
            calls = int(a.queue * a.factor)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for _ in range(a.rounds):
                for name, t in targets.items():
                    runs[name].append(
                        asyncio.run(storm(t, calls, a.channels, "what a great game last night"))
                    )
            alive = server.alive()
    rounds = runs["headrace"]
    result = {
        "queue_bound": a.queue,
        "factor": a.factor,
        "channels": a.channels,
        "measured": rounds[-1],
        "warmup": rounds[:-1],
        "server_alive_after": alive,
    }
    if "bare_reject" in runs:
        result["bare_reject"] = runs["bare_reject"][-1]
    # the median over the measured rounds (all but the first) of each code's p99, per server
    result["p99_ms_median"] = {
        name: {
            code: statistics.median(
                r["latency"][code]["p99_ms"] for r in rs[1:] if code in r["latency"]
            )
            for code in sorted({c for r in rs[1:] for c in r["latency"]})
        }
        for name, rs in runs.items()
    }
    print(json.dumps(result["measured"], indent=2))
    if "bare_reject" in result:
        print("bare server refusing every call:")
        print(json.dumps(result["bare_reject"], indent=2))
    print("p99 ms, median of the measured rounds:", json.dumps(result["p99_ms_median"]))
    if a.out is not None:
        write_json(a.out, result)


if __name__ == "__main__":
    main()

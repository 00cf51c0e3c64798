"""The engine IPC's own cost: round trips of an empty request (PING) to an engine process.

    python -m bench.ipc_roundtrip --models models --profile cpu --out ipc.json

Starts the engine process of `headrace serve --engine-process` (server/engine_ipc/engine.py)
on the repository, connects the front ends' EngineClient to its Unix socket, and times
`--calls` PINGs one after another (front end -> engine event loop -> front end: framing,
the socket both ways, both event loops), then `--concurrency` callers at once (frames
that meet in one loop pass leave in one write). Prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from headrace.server.config import load_config
from headrace.server.engine_ipc.client import EngineClient
from headrace.server.engine_ipc.engine import READY_SUFFIX, SOCKET_ENV
from headrace.server.logs import configure_logging
from headrace.server.workers import CONFIG_ENV, _to_json


async def measure(socket: Path, calls: int, concurrency: int, seconds: float) -> dict[str, Any]:
    async def ignore(catalog: object) -> None:
        return None

    client = EngineClient(socket, ignore)
    await client.start(60)
    for _ in range(200):  # warm-up
        await client.ping()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await client.ping()
        times.append(time.perf_counter() - t0)
    done = 0
    end = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await client.ping()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await client.close()
    times.sort()
    return {
        "calls": calls,
        "p50_us": round(times[len(times) // 2] * 1e6, 1),
        "p99_us": round(times[int(len(times) * 0.99)] * 1e6, 1),
        "mean_us": round(statistics.fmean(times) * 1e6, 1),
        "concurrency": concurrency,
        "pings_per_s": round(done / elapsed, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--backend", default=None)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    configure_logging("json", "warning")  # stdout holds the result alone
    config = load_config(None, {"models": a.models, "profile": a.profile, "backend": a.backend,
                                "poll_interval_s": 0.0, "log_level": "warning"})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="headrace-ipc-") as tmp:
        socket = Path(tmp) / "engine.sock"
        env = dict(os.environ)
        env[CONFIG_ENV] = _to_json(dataclasses.replace(config, port_file=None))
        env[SOCKET_ENV] = str(socket)
        engine = subprocess.Popen([sys.executable, "-m", "headrace.server.engine_ipc.engine"],
                                  env=env)  # fmt: skip
        try:
            ready = socket.with_name(socket.name + READY_SUFFIX)
            while not ready.exists():
                if engine.poll() is not None:
                    sys.exit(f"the engine exited ({engine.returncode})")
                time.sleep(0.1)
            result = asyncio.run(measure(socket, a.calls, a.concurrency, a.duration))
        finally:
            engine.terminate()
            engine.wait(30)
    print(json.dumps(result))
    if a.out is not None:
        a.out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

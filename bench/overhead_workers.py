"""`bench.overhead`'s workers point: `headrace serve --workers 2` against one worker.

The same edge settings, with intra-op threads split so that workers x threads <= cores
(what the supervisor does when no thread count is set); each server is driven by
CLIENTS load generator processes at once, PER_CLIENT callers each (64 in all, one text
per call): the kernel hands each gRPC connection to one worker, so one client process
would reach one worker only. Then one caller alone, for p50. The target: no call failed,
and two workers no worse than one, within TOLERANCE (one run on a shared box moves
more than that).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from bench.common import read_json
from bench.servers import (
    ROOT,
    ServerProcess,
    free_port,
    headrace_cmd,
    models_ready,
    single_model_repo,
)

if TYPE_CHECKING:
    from bench.overhead import Run

CLIENTS = 4
PER_CLIENT = 16
TOLERANCE = 0.05  # calls/s at least 95 % of one worker's, p50 at most 105 %


def measure(run: Run, counts: tuple[int, ...] = (1, 2)) -> dict[int, Any]:
    """{workers: {"calls_per_s": summed over the clients, "p50_ms_1": one caller}}."""
    a, cores = run.a, len(os.sched_getaffinity(0))
    model = a.classify_model
    out: dict[int, Any] = {}
    for n in counts:
        repo = single_model_repo(run.models, [model], run.work / f"repo-workers-{n}")
        port = free_port()
        cmd = headrace_cmd(repo, port, free_port(), "edge")
        cmd += ["--workers", str(n), "--intra-op-threads", str(max(1, cores // n)),
                "--poll-interval", "0", "--host", "127.0.0.1"]  # fmt: skip
        if a.settings is not None:
            cmd += ["--config", str(a.settings)]
        with ServerProcess(f"workers-{n}", cmd, run.work / f"workers-{n}.log") as server:
            target = f"127.0.0.1:{port}"
            server.wait_ready(functools.partial(models_ready, target, [model]), timeout=300)
            points = _clients(run, target, f"workers-{n}", CLIENTS, PER_CLIENT)
            one = run.loadgen("classify", target, server.pid, "1", model=model)[1]
        out[n] = {
            "calls_per_s": sum(p["throughput"] for p in points),
            "per_client_calls_per_s": [p["throughput"] for p in points],
            "errors": dict(
                sum((Counter(p.get("errors") or {}) for p in (*points, one)), Counter())
            ),
            "p50_ms_1": one["p50_ms"],
            "intra_op_threads": max(1, cores // n),
        }
    return out


def _clients(run: Run, target: str, tag: str, clients: int, callers: int) -> list[Any]:
    """`clients` load generator processes at once, each with its own connection."""
    a = run.a
    outs = [run.work / f"{tag}-client-{i}.json" for i in range(clients)]
    procs = []
    for out in outs:
        cmd = [sys.executable, "-m", "bench.loadgen", "classify", "--target", target,
               "--model", a.classify_model, "--concurrency", str(callers),
               "--warmup", str(a.warmup), "--duration", str(a.duration), "--out", str(out)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL))
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"a load generator exited with {proc.returncode}")
    return [read_json(out)["points"][0] for out in outs]


def report_lines(w: dict[int, Any]) -> list[str]:
    if not {1, 2} <= set(w):
        return []
    one, two = w[1], w[2]
    ok = not (one["errors"] or two["errors"]) and (
        two["calls_per_s"] >= (1 - TOLERANCE) * one["calls_per_s"]
        and two["p50_ms_1"] <= (1 + TOLERANCE) * one["p50_ms_1"]
    )
    return [
        f"-- workers ({CLIENTS} client processes x {PER_CLIENT} callers, intra-op threads "
        f"{one['intra_op_threads']} / {two['intra_op_threads']})",
        f"  --workers 2: {two['calls_per_s']:.0f} calls/s vs {one['calls_per_s']:.0f} with one "
        f"({two['calls_per_s'] / one['calls_per_s']:.2f}x); one caller p50 "
        f"{two['p50_ms_1']:.3f} vs {one['p50_ms_1']:.3f} ms; no worse than one worker "
        f"(within {TOLERANCE:.0%}) {'MET' if ok else 'not met'}; "
        f"errors {one['errors'] or 'none'} / {two['errors'] or 'none'}",
    ]

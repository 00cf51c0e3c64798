"""A/B of headrace servers on unary Classify, in interleaved rounds, for a shared or noisy box.

    python -m bench.ab --server before=/src/old --server after=. --rounds 5
    python -m bench.ab --generate --server before=/src/old --server after=. --rounds 5
    python -m bench.ab --server 2threads=.:deploy/edge/headrace-edge.toml \
        --server 1thread=.:/tmp/edge-1thread.toml

Each `--server TAG=DIR[:TOML]` is `headrace serve` from DIR/src (`.`: this checkout)
with the settings TOML (default deploy/edge/headrace-edge.toml), serving the tiny
classifier of bench/overhead.py (or `--models`/`--model`). All servers start once and
stay up (idle, they cost nothing: ONNX Runtime does not spin); the load generator
(bench/loadgen.py) then drives them in turn, round after round, each round led by the
next server (A B C, B C A, C A B ...), so a burst of load from elsewhere lands on every
server alike and none gains from its place in the round (with a fixed order the server
measured second came out up to 7 % ahead of the same server measured first). Per
server it prints the median over rounds of calls/s at `--concurrency` callers, server
CPU µs per call (from /proc, all threads, and the event loop's own), and p50 at 1
caller. With
`--generate`, the tiny generator instead: GenerateStream tokens/s and server CPU µs per
token at 16 streams x 64 tokens, one message per token (stream_interval 1) and 8 per
message, and the time to first token and inter-token latency of one stream.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import read_json, write_json
from bench.overhead import EDGE_CONFIG, per_call_us, tiny_models
from bench.servers import (
    ROOT,
    ServerProcess,
    free_port,
    headrace_cmd,
    models_ready,
    single_model_repo,
)


def loadgen(
    target: str, pid: int, concurrency: int, a: argparse.Namespace, work: Path, interval: int = 0
) -> Any:
    out = work / f"point-{time.monotonic_ns()}.json"
    mode = ["generate", "--new-tokens", "64", "--stream-interval", str(interval)] if interval else [
        "classify"]  # fmt: skip
    args = ["-m", "bench.loadgen", *mode, "--target", target, "--server-pid", str(pid),
            "--concurrency", str(concurrency), "--warmup", str(a.warmup),
            "--duration", str(a.duration), "--model", a.model, "--out", str(out)]  # fmt: skip
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return read_json(out)["points"][0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--server", action="append", required=True, metavar="TAG=DIR[:TOML]")
    p.add_argument("--models", type=Path, help="model repository (default: tiny models)")
    p.add_argument("--model", default=None, help="default tiny-classifier (tiny-generator)")
    p.add_argument("--generate", action="store_true", help="GenerateStream, not Classify")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "ab.json")
    a = p.parse_args(argv)
    a.model = a.model or ("tiny-generator" if a.generate else "tiny-classifier")
    models = a.models.resolve() if a.models else tiny_models()
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        repo = single_model_repo(models, [a.model], work / "repo")
        servers: list[tuple[str, ServerProcess, str]] = []
        for spec in a.server:
            tag, _, rest = spec.partition("=")
            folder, _, toml = rest.partition(":")
            port = free_port()
            cmd = headrace_cmd(repo, port, free_port(), "edge")  # /metrics on, as served
            cmd = [c for c in cmd if c not in ("--log-level", "warning")]
            cmd += ["--log-level", "info", "--poll-interval", "0", "--host", "127.0.0.1",
                    "--config", str(Path(toml or EDGE_CONFIG).resolve())]  # fmt: skip
            env = {"PYTHONPATH": str(Path(folder).resolve() / "src")}
            server = stack.enter_context(ServerProcess(tag, cmd, work / f"{tag}.log", env=env))
            target = f"127.0.0.1:{port}"
            server.wait_ready(lambda t=target: models_ready(t, [a.model]), timeout=300)
            servers.append((tag, server, target))
            rows[tag] = []
        for r in range(a.rounds):
            turn = r % len(servers)  # each server leads a round in turn (A B, B A, ...)
            for tag, server, target in servers[turn:] + servers[:turn]:
                if a.generate:
                    rows[tag].append(generate_round(target, server.pid, a, work))
                    print(f"round {r + 1} {tag}: {rows[tag][-1]}", flush=True)
                    continue
                many = loadgen(target, server.pid, a.concurrency, a, work)
                one = loadgen(target, server.pid, 1, a, work)
                cpu = per_call_us(many, a.duration)
                rows[tag].append({
                    "calls_per_s": many["throughput"],
                    "cpu_us_per_call": cpu["total"],
                    "event_loop_us_per_call": cpu.get("event_loop", 0.0),
                    "p50_ms_1": one["p50_ms"],
                    "cpu_us_per_call_1": per_call_us(one, a.duration)["total"],
                })  # fmt: skip
                print(f"round {r + 1} {tag}: {rows[tag][-1]}", flush=True)
    med = {t: {k: statistics.median(x[k] for x in v) for k in v[0]} for t, v in rows.items()}
    write_json(a.out, {"settings": {k: str(v) for k, v in vars(a).items()}, "rounds": rows,
                       "median": med})  # fmt: skip
    if a.generate:
        print(f"median of {a.rounds} rounds, GenerateStream 64 tokens:")
        for tag, m in med.items():
            print(
                f"  {tag:>12}: 16 streams {m['tokens_per_s_i1']:6.0f} tok/s "
                f"({m['cpu_us_per_token_i1']:4.0f} µs CPU/token) at 1 token/message, "
                f"{m['tokens_per_s_i8']:6.0f} tok/s ({m['cpu_us_per_token_i8']:4.0f} µs) at 8; "
                f"1 stream: TTFT p50 {m['ttft_p50_ms_1']:.3f} ms, "
                f"ITL p50 {m['itl_p50_ms_1']:.3f} ms"
            )
        return
    print(f"median of {a.rounds} rounds, {a.concurrency} callers:")
    for tag, m in med.items():
        print(
            f"  {tag:>12}: {m['calls_per_s']:6.0f} calls/s, CPU/call {m['cpu_us_per_call']:5.0f}"
            f" µs (event loop {m['event_loop_us_per_call']:4.0f}); 1 caller: p50 "
            f"{m['p50_ms_1']:.3f} ms, CPU/call {m['cpu_us_per_call_1']:5.0f} µs"
        )


def generate_round(target: str, pid: int, a: argparse.Namespace, work: Path) -> dict[str, float]:
    row: dict[str, float] = {}
    for n in (1, 8):
        point = loadgen(target, pid, 16, a, work, interval=n)
        row[f"tokens_per_s_i{n}"] = point["tokens_per_s"]
        row[f"cpu_us_per_token_i{n}"] = (
            1e6 * point["server_cores"] / max(point["tokens_per_s"], 1e-9)
        )
    one = loadgen(target, pid, 1, a, work, interval=1)
    row["ttft_p50_ms_1"] = one["ttft_p50_ms"]
    row["itl_p50_ms_1"] = one["itl_p50_ms"]  # a lone stream's pace (a chat user's view)
    return row


if __name__ == "__main__":
    main()

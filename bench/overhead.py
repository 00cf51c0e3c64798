"""Per-request cost: headrace next to the transport floor and the raw backend, in one run.

    python -m bench.overhead --models models                      # demo sentiment + tweetgpt
    python -m bench.overhead --models models --baseline /src/old  # + another checkout's server
    python -m bench.overhead --baseline before=/src/old --baseline cut1=/src/cut1  # several
    python -m bench.overhead                                      # tiny models built here

One after another, each server in its own process and the load generator
(bench/loadgen.py) in another, so no two measurements share the CPU:

  raw        bench/limits.py: the backend in-process (texts/s at its best batch, batch-1
             time; decode tokens/s at 16 slots, one prompt's prefill time)
  floor      bench/bare_server.py: grpc.aio answering Classify with a canned response,
             and GenerateStream with canned chunks (the streaming floor)
  engine     bench/engine_server.py: grpc.aio and headrace's batcher and model (its
             repository, the same settings) behind a canned response: headrace minus
             this is what the service layers (checks, lease, conversion, log line,
             metrics) cost per call
  headrace   `headrace serve` with the edge settings (deploy/edge/headrace-edge.toml:
             2 intra-op threads, no spinning), the log line per RPC and /metrics on
  default    the same with no settings file (only at 1 caller: idle spinning shows there)
  baseline   `--baseline [TAG=]DIR` (repeatable): headrace from another checkout (DIR/src),
             same settings; reported under TAG (default "baseline")
  variant    `--variant TAG=TOML` (repeatable): this checkout's server with other settings
  workers    `headrace serve --workers 2` and with one worker, threads split, each driven by
             4 load generator processes x 16 callers (bench/overhead_workers.py;
             `--no-workers` skips it)

Classify sends one short tweet per call (64 callers, then 1); generation runs 16
streams of 64 tokens at each `--gen-intervals` tokens per message (the request's
stream_interval; 1, the server's default, sends a message per token unless the reader
is behind), and 1 stream at interval 1 for time to first token. `--generate-only` skips
the classify points (and the floor, raw classify and default-settings servers). Server CPU per call comes from /proc/PID/task/*/stat
over the measured window, split by thread (bench/common.thread_group: the event loop is
the main thread; the batcher, ORT's pool and gRPC's threads carry OS names). The targets
of the per-request cost budget are printed at the end:

  L = 1 / (1/floor + 1/raw)           classify calls/s at 64 callers >= 85 % of L
  p50 at 1 caller                     <= floor p50 + raw batch-1 time + 0.3 ms
  server CPU per call at 64 callers   <= 1.3 x (floor CPU per call + raw CPU per text)
  generate, 16 streams                >= 80 % of the raw decode tokens/s at 16 slots
  TTFT p50 at 1 stream                <= raw prefill + 1 ms
  --workers 2                         calls/s and one caller's p50 no worse than one
                                      worker's (within 5 %), no call failed
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import overhead_workers
from bench.common import newest_version, read_json, write_json
from bench.servers import (
    ROOT,
    ServerProcess,
    channel_ready,
    free_port,
    headrace_cmd,
    models_ready,
    single_model_repo,
)

EDGE_CONFIG = ROOT / "deploy" / "edge" / "headrace-edge.toml"


class Run:
    def __init__(self, a: argparse.Namespace, models: Path, work: Path) -> None:
        self.a = a
        self.models = models
        self.work = work
        self.results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(a).items()}}

    def child(self, args: list[str], tag: str) -> Any:
        out = self.work / f"{tag}-{time.monotonic_ns()}.json"
        subprocess.run([sys.executable, *args, "--out", str(out)], check=True, cwd=ROOT)
        return read_json(out)

    def loadgen(self, mode: str, target: str, pid: int, concurrency: str, **kw: Any) -> Any:
        args = ["-m", "bench.loadgen", mode, "--target", target, "--server-pid", str(pid),
                "--concurrency", concurrency, "--warmup", str(self.a.warmup),
                "--duration", str(self.a.duration)]  # fmt: skip
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        points = self.child(args, f"loadgen-{mode}")["points"]
        return {p["concurrency"]: p for p in points}

    def generate(self, target: str, pid: int) -> dict[int, Any]:
        """{tokens per message: {streams: point}}: 16 streams at each interval, and
        1 stream at interval 1 (time to first token)."""
        out = {}
        for n in self.a.gen_intervals:
            streams = "16,1" if n == 1 else "16"
            out[n] = self.loadgen("generate", target, pid, streams, model=self.a.generate_model,
                                  new_tokens=64, stream_interval=n)  # fmt: skip
        return out

    # -- phases -------------------------------------------------------------------------

    def raw(self) -> None:
        # the server's session options (threads, spinning), so raw and served run alike
        opts = ["--settings", str(self.a.settings)] if self.a.settings else []
        cls = self.models / self.a.classify_model
        if not self.a.generate_only:
            self.results["raw_classify"] = self.child(
                ["-m", "bench.limits", "classify", "--model-dir", str(cls), "--profile", "edge",
                 "--seconds", str(self.a.raw_seconds), "--batches", "1,4,16,32,64", *opts],
                "raw-classify",
            )  # fmt: skip
        if self.a.generate_model:
            gen = self.models / self.a.generate_model
            self.results["raw_generate"] = self.child(
                ["-m", "bench.limits", "generate", "--model-dir", str(gen), "--profile", "edge",
                 "--batches", "1,16", "--new-tokens", "64", "--repeats", "1", *opts],
                "raw-generate",
            )  # fmt: skip

    def floor(self) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "bench.bare_server", "--port", str(port)]
        with ServerProcess("bare", cmd, self.work / "bare.log") as server:
            target = f"127.0.0.1:{port}"
            server.wait_ready(lambda: channel_ready(target), timeout=60)
            if not self.a.generate_only:
                self.results["floor"] = self.loadgen(
                    "classify", target, server.pid, "64,1", model=self.a.classify_model
                )
            if self.a.generate_model:  # canned chunks: the streaming floor
                self.results["floor_generate"] = self.generate(target, server.pid)

    def engine(self) -> None:
        repo = single_model_repo(self.models, [self.a.classify_model], self.work / "repo-engine")
        port = free_port()
        cmd = [sys.executable, "-m", "bench.engine_server", "--port", str(port),
               "--models", str(repo), "--model", self.a.classify_model]  # fmt: skip
        if self.a.settings:
            cmd += ["--settings", str(self.a.settings)]
        with ServerProcess("engine", cmd, self.work / "engine.log") as server:
            target = f"127.0.0.1:{port}"
            server.wait_ready(lambda: channel_ready(target), timeout=120)
            self.results["engine"] = self.loadgen(
                "classify", target, server.pid, "64,1", model=self.a.classify_model
            )

    def headrace(self, tag: str, settings: Path | None, src: Path | None, full: bool) -> None:
        names = [n for n in self.a.served if n]
        repo = single_model_repo(self.models, names, self.work / f"repo-{tag}")
        port, metrics_port = free_port(), free_port()
        cmd = headrace_cmd(repo, port, metrics_port, "edge")
        # the per-RPC log line stays on (info), as in production; poll off: no rescans mid-run
        cmd = [c for c in cmd if c not in ("--log-level", "warning")]
        cmd += ["--log-level", "info", "--poll-interval", "0", "--host", "127.0.0.1"]
        if settings is not None:
            cmd += ["--config", str(settings)]
        env = {"PYTHONPATH": str(src / "src")} if src is not None else None
        with ServerProcess(tag, cmd, self.work / f"{tag}.log", env=env) as server:
            target = f"127.0.0.1:{port}"
            server.wait_ready(lambda: models_ready(target, names), timeout=300)
            out: dict[str, Any] = {}
            if not self.a.generate_only:
                out["classify"] = self.loadgen(
                    "classify", target, server.pid, "64,1" if full else "1", model=names[0]
                )
            if full and self.a.generate_model:
                out["generate"] = self.generate(target, server.pid)
            if self.a.py_spy and tag == "headrace" and not self.a.generate_only:
                self.profile(server.pid, target, names[0])
            self.results[tag] = out

    def profile(self, pid: int, target: str, model: str) -> None:
        """py-spy over a further classify point at 64 callers (not one of the measured ones)."""
        out = self.a.py_spy
        cmd = [self.a.py_spy_bin, "record", "-p", str(pid), "-d", str(math.ceil(self.a.duration + 1)),
               "-r", "250", "-f", "raw", "-o", str(out), "--nonblocking", "--threads"]  # fmt: skip
        if self.a.native:
            cmd.append("--native")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.loadgen("classify", target, pid, "64", model=model)
        spy.wait(60)
        print(f"py-spy profile (collapsed stacks) in {out}", flush=True)


# -- the figures -------------------------------------------------------------------------


def per_call_us(point: dict[str, Any], window_s: float) -> dict[str, float]:
    """Server CPU µs per completed call in the window: all, and per thread group."""
    calls = point["throughput"] * window_s
    out = {"total": 1e6 * point["server_cores"] * window_s / calls}
    for group, seconds in sorted(point.get("server_threads_s", {}).items()):
        out[group] = 1e6 * seconds / calls
    return out


def per_token_us(point: dict[str, Any]) -> float:
    """Server CPU µs per token received in the window."""
    return 1e6 * point["server_cores"] / max(point["tokens_per_s"], 1e-9)


def figures(r: dict[str, Any], duration: float) -> dict[str, Any]:
    f: dict[str, Any] = {"servers": {}}
    raw = r.get("raw_classify")
    if raw:
        raw_tps = raw["limit_texts_per_s"]
        raw_b1_ms = next(row["ms_per_call"] for row in raw["by_batch"] if row["batch"] == 1)
        floor64, floor1 = r["floor"][64], r["floor"][1]
        limit = 1.0 / (1.0 / floor64["throughput"] + 1.0 / raw_tps)
        floor_cpu = per_call_us(floor64, duration)["total"]
        f |= {
            "floor_calls_per_s": floor64["throughput"],
            "floor_p50_ms_1": floor1["p50_ms"],
            "floor_cpu_us_per_call": floor_cpu,
            "raw_texts_per_s": raw_tps,
            "raw_best_batch": raw["best_batch"],
            "raw_batch1_ms": raw_b1_ms,
            "raw_batch1_after_idle_ms": raw.get("batch1_after_idle_ms"),
            # CPU, not wall, per text at the best batch (with 2 intra-op threads up to 2x)
            "raw_cpu_us_per_text": raw.get("cpu_us_per_text") or 1e6 / raw_tps,
            "L_calls_per_s": limit,
        }
    engine = r.get("engine")
    if engine:
        f |= {
            "engine_calls_per_s": engine[64]["throughput"],
            "engine_cpu_us_per_call": per_call_us(engine[64], duration),
            "engine_p50_ms_1": engine[1]["p50_ms"],
        }
    gen = r.get("raw_generate")
    if gen:
        rows = {row["batch"]: row for row in gen["by_batch"]}
        f["raw_decode_tokens_per_s_16"] = rows[16]["tokens_per_s"]
        f["raw_prefill_ms"] = rows[1].get("prefill_ms")
        f["raw_prefill_after_idle_ms"] = gen.get("prefill_after_idle_ms")
    for n, points in sorted((r.get("floor_generate") or {}).items()):
        f.setdefault("floor_generate", {})[n] = {
            "tokens_per_s_16": points[16]["tokens_per_s"],
            "messages_per_s_16": points[16]["messages_per_s"],
            "cpu_us_per_message_16": 1e6
            * points[16]["server_cores"]
            / max(points[16]["messages_per_s"], 1e-9),
            "ttft_p50_ms_1": points[1]["ttft_p50_ms"] if 1 in points else None,
        }
    tags = ["headrace", *r.get("baseline_tags", []), "default"]
    for tag in tags:
        if tag not in r:
            continue
        cls = r[tag].get("classify") or {}
        s: dict[str, Any] = {}
        if 64 in cls:
            p64 = cls[64]
            cpu = per_call_us(p64, duration)
            s |= {
                "calls_per_s_64": p64["throughput"],
                "pct_of_L": 100.0 * p64["throughput"] / limit,
                "cpu_us_per_call_64": cpu,
                "cpu_budget_us": 1.3 * (floor_cpu + f["raw_cpu_us_per_text"]),
                "cpu_budget_wall_us": 1.3 * (floor_cpu + 1e6 / raw_tps),  # as before
            }
            if engine:  # what the service layers add per call, by thread
                base = f["engine_cpu_us_per_call"]
                s["layers_cpu_us_per_call_64"] = {k: v - base.get(k, 0.0) for k, v in cpu.items()}
        if 1 in cls:
            p1 = cls[1]
            s |= {
                "p50_ms_1": p1["p50_ms"],
                "p50_budget_ms": floor1["p50_ms"] + raw_b1_ms + 0.3,
                "p50_budget_idle_ms": _plus(f["raw_batch1_after_idle_ms"], floor1["p50_ms"] + 0.3),
                "cpu_us_per_call_1": per_call_us(p1, duration),
            }
        g = r[tag].get("generate")
        if g and gen:
            s["gen_16"] = {
                n: {
                    "tokens_per_s": points[16]["tokens_per_s"],
                    "messages_per_s": points[16].get("messages_per_s"),
                    "pct_of_raw": 100.0
                    * points[16]["tokens_per_s"]
                    / f["raw_decode_tokens_per_s_16"],
                    "cpu_us_per_token": per_token_us(points[16]),
                }
                for n, points in sorted(g.items())
            }
            if 1 in g:
                s |= {
                    "ttft_p50_ms_1": g[1][1]["ttft_p50_ms"],
                    "ttft_p99_ms_1": g[1][1]["ttft_p99_ms"],
                    "itl_p50_ms_1": g[1][1]["itl_p50_ms"],
                    "ttft_budget_ms": (f["raw_prefill_ms"] or 0.0) + 1.0,
                    "ttft_budget_idle_ms": _plus(f["raw_prefill_after_idle_ms"], 1.0),
                }
        f["servers"][tag] = s
    return f


def _plus(ms: float | None, more: float) -> float | None:
    return None if ms is None else ms + more


def _against_idle(value: float, budget: float | None) -> str:
    if budget is None:
        return ""
    return f"; with the raw call after 1 ms idle: budget {budget:.3f} ms " + (
        "MET" if value <= budget else "not met"
    )


def _idle(ms: float | None) -> str:
    """The same call after 1 ms idle, as a lone caller's meets it (bench/limits.py)."""
    return "" if ms is None else f" back to back, {ms:.3f} ms after 1 ms idle"


def report(f: dict[str, Any]) -> str:
    lines = []
    if "floor_calls_per_s" in f:
        lines += [
            f"floor (bare grpc.aio): {f['floor_calls_per_s']:.0f} calls/s at 64, "
            f"p50 {f['floor_p50_ms_1']:.3f} ms at 1, {f['floor_cpu_us_per_call']:.0f} µs CPU/call",
            f"raw backend: {f['raw_texts_per_s']:.0f} texts/s at batch {f['raw_best_batch']}, "
            f"batch 1 {f['raw_batch1_ms']:.3f} ms{_idle(f['raw_batch1_after_idle_ms'])}; "
            f"{f['raw_cpu_us_per_text']:.0f} µs CPU per text at its best batch",
            f"L = 1/(1/floor + 1/raw) = {f['L_calls_per_s']:.0f} calls/s",
        ]
    if "engine_calls_per_s" in f:
        cpu = f["engine_cpu_us_per_call"]
        parts = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if k != "total" and v >= 1)
        lines.append(
            f"floor + engine (batcher and model, canned answer): {f['engine_calls_per_s']:.0f} "
            f"calls/s at 64, p50 {f['engine_p50_ms_1']:.3f} ms at 1, "
            f"{cpu['total']:.0f} µs CPU/call ({parts})"
        )
    if "raw_decode_tokens_per_s_16" in f:
        lines.append(
            f"raw decode: {f['raw_decode_tokens_per_s_16']:.0f} tokens/s at 16 slots, "
            f"prefill {f['raw_prefill_ms']:.3f} ms{_idle(f['raw_prefill_after_idle_ms'])}"
        )
    for n, g in f.get("floor_generate", {}).items():
        ttft = f", TTFT p50 {g['ttft_p50_ms_1']:.3f} ms at 1" if g["ttft_p50_ms_1"] else ""
        lines.append(
            f"floor GenerateStream (canned chunks), interval {n}: {g['tokens_per_s_16']:.0f} "
            f"tokens/s in {g['messages_per_s_16']:.0f} messages/s at 16, "
            f"{g['cpu_us_per_message_16']:.0f} µs server CPU/message{ttft}"
        )
    for tag, s in f["servers"].items():
        lines.append(f"-- {tag}")
        if "calls_per_s_64" in s:
            ok = s["pct_of_L"] >= 85
            lines.append(
                f"  classify 64 callers: {s['calls_per_s_64']:.0f} calls/s = "
                f"{s['pct_of_L']:.1f} % of L (target 85 %) {'MET' if ok else 'not met'}"
            )
            cpu = s["cpu_us_per_call_64"]
            parts = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if k != "total")
            ok = cpu["total"] <= s["cpu_budget_us"]
            lines.append(
                f"  CPU/call at 64: {cpu['total']:.0f} µs ({parts}); budget "
                f"{s['cpu_budget_us']:.0f} µs {'MET' if ok else 'not met'} (with the raw wall "
                f"time per text in place of its CPU: {s['cpu_budget_wall_us']:.0f} µs)"
            )
        if "layers_cpu_us_per_call_64" in s:
            d = s["layers_cpu_us_per_call_64"]
            parts = ", ".join(f"{k} {v:+.0f}" for k, v in d.items() if k != "total" and abs(v) >= 1)
            lines.append(f"  service layers over floor + engine: {d['total']:+.0f} µs/call ({parts})")
        if "p50_ms_1" in s:
            ok = s["p50_ms_1"] <= s["p50_budget_ms"]
            lines.append(
                f"  classify 1 caller: p50 {s['p50_ms_1']:.3f} ms; budget "
                f"{s['p50_budget_ms']:.3f} ms "
                f"(+{s['p50_ms_1'] - s['p50_budget_ms'] + 0.3:.3f} ms over floor + raw) "
                f"{'MET' if ok else 'not met'}; CPU/call {s['cpu_us_per_call_1']['total']:.0f} µs"
                + _against_idle(s["p50_ms_1"], s.get("p50_budget_idle_ms"))
            )
        for n, g in s.get("gen_16", {}).items():
            ok = g["pct_of_raw"] >= 80
            lines.append(
                f"  generate 16 streams, interval {n}: {g['tokens_per_s']:.0f} tokens/s in "
                f"{g['messages_per_s'] or 0:.0f} messages/s = {g['pct_of_raw']:.1f} % of raw "
                f"(target 80 %) {'MET' if ok else 'not met'}; "
                f"{g['cpu_us_per_token']:.0f} µs server CPU/token"
            )
        if "ttft_p50_ms_1" in s:
            ok = s["ttft_p50_ms_1"] <= s["ttft_budget_ms"]
            lines.append(
                f"  TTFT 1 stream: p50 {s['ttft_p50_ms_1']:.3f} ms (p99 {s['ttft_p99_ms_1']:.3f}, "
                f"ITL p50 {s['itl_p50_ms_1']:.3f}); budget {s['ttft_budget_ms']:.3f} ms "
                f"(raw prefill + 1 ms) {'MET' if ok else 'not met'}"
                + _against_idle(s["ttft_p50_ms_1"], s.get("ttft_budget_idle_ms"))
            )
    return "\n".join(lines)


TINY = ROOT / ".cache" / "bench" / "tiny-onnx"


def tiny_models() -> Path:
    """The tiny random models with ONNX artifacts, built once into .cache/bench/tiny-onnx."""
    from bench.edge_overhead import tiny_repo

    if not (TINY / "tiny-generator" / "1" / "headrace.json").exists():
        tmp = TINY.with_name(TINY.name + ".tmp")
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        tiny_repo(tmp)
        # 16 KV slots, so that 16 streams decode together as the raw limit's 16 slots do
        manifest = tmp / "tiny-generator" / "1" / "headrace.json"
        data = read_json(manifest)
        data["batching"]["max_batch"] = 16
        write_json(manifest, data)
        tmp.replace(TINY)
    return TINY


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", type=Path, help="model repository (default: tiny models)")
    p.add_argument("--classify-model", default=None, help="default sentiment (tiny-classifier)")
    p.add_argument("--generate-model", default=None, help="default tweetgpt (tiny-generator)")
    p.add_argument("--settings", type=Path, default=EDGE_CONFIG, help="headrace settings TOML")
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="[TAG=]DIR",
        help="another checkout: its server, same load (repeatable)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="TAG=TOML",
        help="this checkout's server with another settings file (repeatable)",
    )
    p.add_argument("--no-default", action="store_true", help="skip the no-settings server")
    p.add_argument("--no-workers", action="store_true", help="skip --workers 2 against one worker")
    p.add_argument(
        "--gen-intervals",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 8],
        help="tokens per message of the 16-stream generate points (1: also TTFT at 1 stream)",
    )
    p.add_argument("--generate-only", action="store_true", help="no classify points")
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--raw-seconds", type=float, default=1.0, help="raw: seconds per batch size")
    p.add_argument("--py-spy", type=Path, metavar="FILE", help="profile headrace at 64 callers")
    p.add_argument("--py-spy-bin", default="py-spy", help="the py-spy executable")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "overhead.json")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = a.models.resolve() if a.models else tiny_models()
        tiny = a.models is None
        a.classify_model = a.classify_model or ("tiny-classifier" if tiny else "sentiment")
        a.generate_model = a.generate_model or ("tiny-generator" if tiny else "tweetgpt")
        # the models every headrace server loads (with --generate-only, the generator alone)
        a.served = [a.generate_model] if a.generate_only else [a.classify_model, a.generate_model]
        for name in a.served:
            newest_version(models / name)  # fails early on a missing model
        run = Run(a, models, work)
        t0 = time.monotonic()
        run.raw()
        run.floor()
        if not a.generate_only:
            run.engine()
        run.headrace("headrace", a.settings, None, full=True)
        run.results["baseline_tags"] = []
        for spec in a.baseline:
            tag, _, folder = spec.rpartition("=")
            tag = tag or "baseline"
            run.results["baseline_tags"].append(tag)
            run.headrace(tag, a.settings, Path(folder).resolve(), full=True)
        for spec in a.variant:
            tag, _, toml = spec.partition("=")
            run.results["baseline_tags"].append(tag)
            run.headrace(tag, Path(toml).resolve(), None, full=True)
        if not (a.no_default or a.generate_only):
            run.headrace("default", None, None, full=False)
        if not (a.no_workers or a.generate_only):
            run.results["workers"] = overhead_workers.measure(run)
        r = run.results
        r["figures"] = figures(r, a.duration)
        r["machine"] = {"cpus": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg()}
        r["seconds"] = round(time.monotonic() - t0, 1)
    text = "\n".join([report(r["figures"]), *overhead_workers.report_lines(r.get("workers", {}))])
    r["report"] = text.splitlines()
    write_json(a.out, r)
    print(text)


if __name__ == "__main__":
    main()

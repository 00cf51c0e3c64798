"""The bench's own parts: the verdicts of the report, the metrics reader, and the load
generator against a real headrace server on the tiny models (a second or two a point)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import read_json
from bench.report import render, targets
from bench.servers import (
    ROOT,
    ServerProcess,
    free_port,
    headrace_cmd,
    metric_value,
    models_ready,
    scrape_metric,
)


def _results(classify_64: dict, limit: float, gen16: float, gen1: float, lim16: float) -> dict:
    return {
        "environment": {"cores": 2},
        "classify_limit": {"limit_texts_per_s": limit, "by_batch": []},
        "classify_headrace": {"points": [{"concurrency": 64, **classify_64}]},
        "generate_limit": {"by_batch": [{"batch": 16, "tokens_per_s": lim16, "step_ms": 1.0}]},
        "generate_headrace": {
            "points": [
                {"concurrency": 1, "tokens_per_s": gen1},
                {"concurrency": 16, "tokens_per_s": gen16},
            ],
            "cancel": {
                "streams": 1000,
                "active_slots_after": 0.0,
                "rss_before_mb": 500.0,
                "rss_after_mb": 560.0,
            },
        },
    }


def test_targets_pass_and_fail_on_the_numbers() -> None:
    r = _results(
        {"throughput": 900.0, "p50_ms": 50.0, "p99_ms": 200.0}, 1000.0, 900.0, 200.0, 1000.0
    )
    verdicts = {name: ok for name, _, _, ok in targets(r)}
    assert verdicts["classify, 64 callers: throughput / raw limit"] is True  # 90% >= 85%
    assert verdicts["classify, 64 callers: p99 / p50"] is False  # 4x > 3x
    assert verdicts["generate, 16 streams: tokens/s / raw batch-16 decode limit"] is True
    assert verdicts["generate, 16 streams / 1 stream"] is True  # 4.5x
    assert verdicts["1000 streams cancelled mid-generation: slots in use after"] is True
    assert verdicts["... server RSS growth"] is False  # +60 MiB on 500 MiB is past the noise bound
    r = _results(
        {"throughput": 800.0, "p50_ms": 50.0, "p99_ms": 100.0}, 1000.0, 700.0, 300.0, 1000.0
    )
    verdicts = {name: ok for name, _, _, ok in targets(r)}
    assert verdicts["classify, 64 callers: throughput / raw limit"] is False
    assert verdicts["classify, 64 callers: p99 / p50"] is True
    assert verdicts["generate, 16 streams: tokens/s / raw batch-16 decode limit"] is False
    assert verdicts["generate, 16 streams / 1 stream"] is False  # 2.3x
    assert "**FAIL**" in render(r, [])


def test_metric_value_reads_prometheus_text() -> None:
    text = (
        "# HELP headrace_active_slots KV-cache slots holding a running sequence.\n"
        "# TYPE headrace_active_slots gauge\n"
        'headrace_active_slots{model="a"} 3.0\n'
        'headrace_active_slots{model="b"} 1.0\n'
        'headrace_active_slots_other{model="a"} 7.0\n'
    )
    assert metric_value(text, "headrace_active_slots") == 4.0
    assert metric_value(text, "headrace_active_slots", {"model": "b"}) == 1.0
    assert metric_value(text, "headrace_queue_depth") is None


def test_http_targets() -> None:
    def point(c: int, tps: float, ttft: float) -> dict:
        return {"concurrency": c, "tokens_per_s": tps, "ttft_p50_ms": ttft}

    r = {
        "http_generate": {
            "grpc": {"points": [point(1, 100.0, 3.0), point(16, 1000.0, 30.0)]},
            "sse": {"points": [point(1, 100.0, 3.5), point(16, 950.0, 31.0)]},
        }
    }
    verdicts = [ok for _, _, _, ok in targets(r)]
    assert verdicts == [True, True]
    r["http_generate"]["sse"]["points"] = [point(1, 100.0, 4.5), point(16, 850.0, 31.0)]
    assert [ok for _, _, _, ok in targets(r)] == [False, False]
    assert "SSE" in render(r, [])


@pytest.fixture(scope="module")
def server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory):
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("bench") / "server.log"
    cmd = [*headrace_cmd(tiny_models, port, metrics_port, "cpu"), "--http-port", str(http_port)]
    proc = ServerProcess("headrace", cmd, log)
    target = f"127.0.0.1:{port}"
    proc.http_target = f"127.0.0.1:{http_port}"  # type: ignore[attr-defined]
    try:
        proc.wait_ready(lambda: models_ready(target, ["tiny-classifier", "tiny-generator"]), 120)
        yield proc, target, metrics_port
    finally:
        proc.stop()


def _loadgen(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, "-m", "bench.loadgen", *args, "--out", str(out)],
        check=True,
        cwd=ROOT,
        timeout=120,
    )
    return read_json(out)


def test_loadgen_classify_and_generate_against_a_real_server(server, tmp_path: Path) -> None:
    proc, target, _ = server
    common = [
        "--target",
        target,
        "--server-pid",
        str(proc.pid),
        "--warmup",
        "0.3",
        "--duration",
        "1",
    ]
    run = _loadgen(
        tmp_path, "classify", "--model", "tiny-classifier", "--concurrency", "1,8", *common
    )
    for point in run["points"]:
        assert point["errors"] == {}
        assert point["throughput"] > 0 and point["p50_ms"] <= point["p99_ms"]
        assert point["server_cores"] > 0
    run = _loadgen(
        tmp_path,
        "generate",
        "--model",
        "tiny-generator",
        "--concurrency",
        "2",
        "--new-tokens",
        "8",
        *common,
    )
    point = run["points"][0]
    assert point["errors"] == {} and point["tokens_per_s"] > 0
    assert point["ttft_p50_ms"] is not None and point["itl_p50_ms"] is not None


def test_sse_loadgen_against_a_real_server(server, tmp_path: Path) -> None:
    proc, _, _ = server
    out = tmp_path / "sse.json"
    subprocess.run(
        [sys.executable, "-m", "bench.sse_loadgen", "--target", proc.http_target,
         "--model", "tiny-generator", "--concurrency", "2", "--new-tokens", "8",
         "--warmup", "0.3", "--duration", "1", "--server-pid", str(proc.pid), "--out", str(out)],
        check=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    point = read_json(out)["points"][0]
    assert point["errors"] == {} and point["tokens_per_s"] > 0
    assert point["mean_tokens_per_stream"] == 8.0
    assert point["ttft_p50_ms"] is not None and point["itl_p50_ms"] is not None


def test_loadgen_unknown_model_counts_errors(server, tmp_path: Path) -> None:
    _proc, target, _ = server
    run = _loadgen(
        tmp_path,
        "classify",
        "--model",
        "no-such-model",
        "--target",
        target,
        "--warmup",
        "0",
        "--duration",
        "0.5",
    )
    assert run["points"][0]["throughput"] == 0
    assert run["points"][0]["errors"].get("NOT_FOUND", 0) > 0


def test_cancelled_streams_leave_no_slot_in_use(server, tmp_path: Path) -> None:
    _proc, target, metrics_port = server
    run = _loadgen(
        tmp_path,
        "cancel",
        "--model",
        "tiny-generator",
        "--target",
        target,
        "--streams",
        "40",
        "--concurrency",
        "8",
    )
    assert sum(run["outcome"].values()) == 40
    assert set(run["outcome"]) <= {"cancelled_after_0", "cancelled_after_1-6"}
    import time

    deadline = time.monotonic() + 10
    while scrape_metric(metrics_port, "headrace_active_slots") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scrape_metric(metrics_port, "headrace_active_slots") == 0


def _point(calls_per_s: float, cores: float, p50_ms: float = 1.0) -> dict[str, float]:
    return {"throughput": calls_per_s, "server_cores": cores, "p50_ms": p50_ms}


def test_overhead_budgets_compare_cpu_to_cpu_and_cold_to_cold() -> None:
    from bench.overhead import figures, report

    raw = {
        "by_batch": [{"batch": 1, "ms_per_call": 0.6}, {"batch": 4, "ms_per_call": 2.4}],
        "best_batch": 4, "limit_texts_per_s": 2000.0, "cpu_us_per_text": 1000.0,
        "batch1_after_idle_ms": 0.9,
    }  # fmt: skip
    r = {
        "raw_classify": raw,
        "floor": {64: _point(5000.0, 1.0, 0.5), 1: _point(1000.0, 0.2, 0.5)},
        "headrace": {"classify": {64: _point(1000.0, 1.5), 1: _point(600.0, 0.5, 1.6)}},
    }
    f = figures(r, duration=1.0)
    s = f["servers"]["headrace"]
    # 1.3 x (floor 200 µs + the raw CPU per text, 1,000 µs), not its wall time (500 µs)
    assert s["cpu_budget_us"] == pytest.approx(1560.0)
    assert s["cpu_budget_wall_us"] == pytest.approx(910.0)
    assert s["p50_budget_ms"] == pytest.approx(1.4)  # floor p50 + raw batch 1 + 0.3
    assert s["p50_budget_idle_ms"] == pytest.approx(1.7)  # ... with batch 1 after idle
    text = report(f)
    assert "CPU/call at 64: 1500 µs" in text and "budget 1560 µs MET" in text
    assert "budget 1.400 ms (+0.500 ms over floor + raw) not met" in text
    assert "after 1 ms idle: budget 1.700 ms MET" in text
    raw.pop("cpu_us_per_text")  # an older result: the wall time per text, as before
    raw.pop("batch1_after_idle_ms")
    s = figures(r, duration=1.0)["servers"]["headrace"]
    assert s["cpu_budget_us"] == pytest.approx(910.0) and s["p50_budget_idle_ms"] is None


@pytest.mark.parametrize("task", ["classify", "generate"])
def test_gpu_workers_script_runs_on_a_cpu_box(tmp_path: Path, task: str) -> None:
    """bench/gpu_workers.sh as a GPU run would use it, on CPU: one line per layout."""
    out = tmp_path / "out"
    env = {
        **os.environ, "PY": sys.executable, "TASK": task, "PROFILE": "cpu",
        "BACKEND": "onnxruntime", "RUNS": "1:engine", "LOADGENS": "1", "CONC": "2",
        "STREAMS": "2", "DURATION": "1", "WARMUP": "0.3", "OUT": str(out),
    }  # fmt: skip
    subprocess.run(
        ["bash", "bench/gpu_workers.sh"], cwd=ROOT, env=env, check=True, timeout=300,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    layout, ipc = rows
    assert (layout["workers"], layout["mode"], layout["errors"]) == (1, "engine", {})
    if task == "generate":
        assert layout["tokens_per_s"] > 0 and layout["raw_decode_tokens_per_s"] > 0
        assert 0 < layout["share_of_raw"] < 1.5 and layout["ttft_p50_ms"] > 0
    else:
        assert layout["calls_per_s"] > 0 and layout["one_caller_p50_ms"] > 0
    assert ipc["ipc_roundtrip"]["pings_per_s"] > 0

"""`make bench`: one run of every measurement, then bench/results/REPORT.md and its plots.

    python -m bench.run --models models --out bench/results
    python -m bench.run --models .cache/bench/tiny --classify-model tiny-classifier \
        --teacher-model tiny-classifier --generate-model tiny-generator --quick

Each phase runs in its own processes (the raw limit in-process in a child; every server
in a child; the load generator in a child), one after the other, so no two measurements
share the CPU. A phase that fails is recorded with its error and the run goes on.
Raw results (results.raw.json) and server logs stay out of git; REPORT.md and the PNGs
are the committed report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import mlserver_peer
from bench.common import find_hf_dir, read_json, tweets, write_json
from bench.servers import (
    ROOT,
    ServerProcess,
    channel_ready,
    free_port,
    headrace_cmd,
    headrace_labels,
    kserve_labels,
    mlserver_labels,
    model_info,
    models_ready,
    scrape_metric,
    single_model_repo,
)

# Both servers label these before the load run: the same checkpoint gives the same labels.
SAMPLE_TEXTS = tweets(16, seed=3)


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work = ROOT / ".cache" / "bench" / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"errors": {}}
        if a.merge and self.raw_path.exists():
            # Rerun some phases into an earlier run's results (the report says which, when).
            self.results = read_json(self.raw_path)
            self.results.setdefault("reruns", []).append(
                {"phases": a.only, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
            )
        self.models = Path(a.models).resolve()

    # -- helpers --------------------------------------------------------------------------

    def phase(self, key: str, fn: Callable[[], Any]) -> None:
        print(f"== {key}", flush=True)
        t0 = time.monotonic()
        load0 = os.getloadavg()[0]
        try:
            value = fn()
        except Exception as exc:
            traceback.print_exc()
            self.results["errors"][key] = f"{type(exc).__name__}: {exc}"[:2000]
            return
        if isinstance(value, dict):
            value["load_avg_1m_before"] = round(load0, 2)
            value["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
            value["phase_seconds"] = round(time.monotonic() - t0, 1)
        self.results[key] = value
        write_json(self.raw_path, self.results)

    @property
    def raw_path(self) -> Path:
        return Path(self.a.out) / "results.raw.json"

    def child(self, args: list[str], out: Path, timeout: float) -> Any:
        subprocess.run(
            [sys.executable, *args, "--out", str(out)], check=True, cwd=ROOT, timeout=timeout
        )
        return read_json(out)

    def loadgen(self, mode: str, target: str, model: str, server_pid: int, **kw: Any) -> Any:
        args = [
            "-m",
            "bench.loadgen",
            mode,
            "--target",
            target,
            "--model",
            model,
            "--server-pid",
            str(server_pid),
            "--warmup",
            str(self.a.warmup),
            "--duration",
            str(self.a.duration),
        ]
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        out = self.work / f"loadgen-{mode}-{model}-{time.monotonic_ns()}.json"
        return self.child(args, out, timeout=1800)

    def headrace(self, names: list[str], tag: str) -> tuple[ServerProcess, str, int]:
        repo = single_model_repo(self.models, names, self.work / f"repo-{tag}")
        port, metrics_port = free_port(), free_port()
        server = ServerProcess(
            f"headrace ({tag})",
            [*headrace_cmd(repo, port, metrics_port, self.a.profile), *self.a.server_arg],
            self.work / f"headrace-{tag}.log",
        )
        target = f"127.0.0.1:{port}"
        try:
            server.wait_ready(lambda: models_ready(target, names), timeout=300)
        except BaseException:
            server.stop()
            raise
        return server, target, metrics_port

    # -- phases ---------------------------------------------------------------------------

    def environment(self) -> dict[str, Any]:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        versions = {}
        for mod in ("grpc", "onnxruntime", "torch", "transformers", "numpy", "uvloop"):
            try:
                versions[mod] = __import__(mod).__version__
            except Exception:
                versions[mod] = None
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        ).stdout.strip()
        return {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "versions": versions,
            "commit": commit,
            "profile": self.a.profile,
            "server_args": self.a.server_arg,
            "warmup_s": self.a.warmup,
            "duration_s": self.a.duration,
            "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        }

    def classify_limit(self, model: str) -> Any:
        return self.child(
            [
                "-m",
                "bench.limits",
                "classify",
                "--model-dir",
                str(self.models / model),
                "--profile",
                self.a.profile,
                "--seconds",
                str(self.a.limit_seconds),
            ],
            self.work / f"limit-classify-{model}.json",
            timeout=900,
        )

    def headrace_classify(self, model: str, concurrency: str) -> dict[str, Any]:
        server, target, _ = self.headrace([model], f"classify-{model}")
        with server:
            info = model_info(target, model)
            labels = headrace_labels(target, model, SAMPLE_TEXTS)
            run = self.loadgen("classify", target, model, server.pid, concurrency=concurrency)
        return {"server": "headrace", "model": model, "info": info, "sample_labels": labels, **run}

    def mlserver_classify(self, model: str, batched: bool, concurrency: str) -> dict[str, Any]:
        if not mlserver_peer.available():
            raise RuntimeError("MLServer venv missing: run bench/setup_peers.sh")
        hf = find_hf_dir(self.models / model)
        if hf is None:
            raise RuntimeError(f"{model} has no HF checkpoint (torch artifact)")
        converted = False
        error = mlserver_peer.check_checkpoint(hf)
        if error:
            print(
                f"  transformers 4.41 cannot load {hf}: {error}; writing a compatible copy",
                flush=True,
            )
            hf = mlserver_peer.compatible_copy(hf, self.work / f"{model}-hf-compat")
            error = mlserver_peer.check_checkpoint(hf)
            if error:
                raise RuntimeError(f"MLServer's transformers cannot load the checkpoint: {error}")
            converted = True
        tag = "batched" if batched else "stock"
        max_batch = self.a.mlserver_max_batch or self.manifest_max_batch(model)
        work, grpc_port, http_port = mlserver_peer.prepare(
            self.work / f"mlserver-{tag}",
            model,
            hf.resolve(),
            batched=batched,
            max_batch=max_batch,
            max_batch_time_s=self.a.mlserver_max_batch_time,
        )
        server = mlserver_peer.start(work, model, http_port, self.work / f"mlserver-{tag}.log")
        with server:
            labels = mlserver_labels(f"127.0.0.1:{grpc_port}", model, SAMPLE_TEXTS)
            run = self.loadgen(
                "classify",
                f"127.0.0.1:{grpc_port}",
                model,
                server.pid,
                concurrency=concurrency,
                protocol="mlserver",
            )
        return {
            "server": f"mlserver-{tag}",
            "model": model,
            "checkpoint_converted": converted,
            "sample_labels": labels,
            "max_batch_size": max_batch,
            "max_batch_time_s": self.a.mlserver_max_batch_time,
            **run,
        }

    def kserve_classify(self, model: str, concurrency: int) -> dict[str, Any]:
        """The same server, the same texts, one text per call: headrace.v1 Classify vs KServe
        ModelInfer (raw BYTES in, label and raw FP32 probabilities out, as tritonclient
        sends and reads them), after one unrecorded round, in the order native, KServe, KServe,
        native so drift cancels."""
        server, target, _ = self.headrace([model], f"kserve-{model}")
        points: dict[str, list[dict[str, Any]]] = {"headrace": [], "kserve": []}
        with server:
            info = model_info(target, model)
            native_labels = headrace_labels(target, model, SAMPLE_TEXTS)
            kserve = kserve_labels(target, model, SAMPLE_TEXTS)
            # One unrecorded round first: the first load on a fresh server runs slower
            # (allocator, backend warm-up), which would count against whichever API runs first.
            self.loadgen("classify", target, model, server.pid, concurrency=concurrency)
            for protocol in ("headrace", "kserve", "kserve", "headrace"):
                run = self.loadgen(
                    "classify", target, model, server.pid,
                    concurrency=concurrency, protocol=protocol,
                )  # fmt: skip
                points[protocol] += run["points"]

        def mean(protocol: str) -> float:
            return sum(p["throughput"] for p in points[protocol]) / len(points[protocol])

        native, ks = mean("headrace"), mean("kserve")
        return {
            "server": "headrace",
            "model": model,
            "info": info,
            "concurrency": concurrency,
            "labels_agree": native_labels == kserve,
            "native_throughput": native,
            "kserve_throughput": ks,
            "ratio": ks / native if native else None,
            "points": points,
        }

    def manifest_max_batch(self, model: str) -> int:
        """The batch headrace's batcher uses for `model`, so both servers batch alike."""
        from headrace.server.manifest import read_manifest

        from bench.common import newest_version

        return read_manifest(newest_version(self.models / model)).batching.max_batch

    def generate_limit(self, model: str) -> Any:
        return self.child(
            [
                "-m",
                "bench.limits",
                "generate",
                "--model-dir",
                str(self.models / model),
                "--profile",
                self.a.profile,
                "--new-tokens",
                str(self.a.new_tokens),
            ],
            self.work / f"limit-generate-{model}.json",
            timeout=900,
        )

    def headrace_generate(self, model: str) -> dict[str, Any]:
        server, target, metrics_port = self.headrace([model], f"generate-{model}")
        with server:
            info = model_info(target, model)
            run = self.loadgen(
                "generate",
                target,
                model,
                server.pid,
                concurrency="1,4,16",
                new_tokens=self.a.new_tokens,
            )
            # Cancellation: a warm-up round first, so allocator growth from the first
            # cancellations is not counted, then the measured round.
            self.loadgen(
                "cancel",
                target,
                model,
                server.pid,
                streams=100,
                concurrency=64,
                new_tokens=self.a.new_tokens,
            )
            time.sleep(1.0)
            rss0 = server.rss_mb()
            cancel = self.loadgen(
                "cancel",
                target,
                model,
                server.pid,
                streams=self.a.cancel_streams,
                concurrency=64,
                new_tokens=self.a.new_tokens,
            )
            time.sleep(2.0)  # cancelled sequences leave at the next step
            rss1 = server.rss_mb()
            cancel.update(
                {
                    "rss_before_mb": round(rss0, 1),
                    "rss_after_mb": round(rss1, 1),
                    "active_slots_after": scrape_metric(metrics_port, "headrace_active_slots"),
                    "queue_depth_after": scrape_metric(metrics_port, "headrace_queue_depth"),
                }
            )
        return {"server": "headrace", "model": model, "info": info, **run, "cancel": cancel}

    def naive_generate(self, model: str) -> dict[str, Any]:
        hf = find_hf_dir(self.models / model)
        if hf is None:
            raise RuntimeError(f"{model} has no HF checkpoint (torch artifact)")
        port = free_port()
        server = ServerProcess(
            "naive transformers server",
            [
                sys.executable,
                "-m",
                "bench.naive_server",
                "--hf",
                str(hf),
                "--port",
                str(port),
                "--name",
                model,
            ],
            self.work / "naive.log",
        )
        target = f"127.0.0.1:{port}"
        with server:
            server.wait_ready(lambda: channel_ready(target), timeout=300)
            run = self.loadgen(
                "generate",
                target,
                model,
                server.pid,
                concurrency="1,4,16",
                new_tokens=self.a.new_tokens,
            )
        return {"server": "naive-transformers", "model": model, **run}

    def run(self) -> None:
        a = self.a
        conc = "1,4,16,64"
        if not (a.merge and "environment" in self.results):
            self.phase("environment", self.environment)
        if "classify" in a.only:
            self.phase("classify_limit", lambda: self.classify_limit(a.classify_model))
            self.phase("classify_headrace", lambda: self.headrace_classify(a.classify_model, conc))
        if "kserve" in a.only:
            self.phase("classify_kserve", lambda: self.kserve_classify(a.classify_model, 64))
        if "peers" in a.only:
            self.phase("teacher_limit", lambda: self.classify_limit(a.teacher_model))
            self.phase("teacher_headrace", lambda: self.headrace_classify(a.teacher_model, conc))
            if not a.skip_mlserver:
                self.phase(
                    "teacher_mlserver_stock",
                    lambda: self.mlserver_classify(a.teacher_model, False, conc),
                )
                self.phase(
                    "teacher_mlserver_batched",
                    lambda: self.mlserver_classify(a.teacher_model, True, conc),
                )
        if "generate" in a.only:
            self.phase("generate_limit", lambda: self.generate_limit(a.generate_model))
            self.phase("generate_headrace", lambda: self.headrace_generate(a.generate_model))
            self.phase("generate_naive", lambda: self.naive_generate(a.generate_model))
        write_json(self.raw_path, self.results)
        from bench.report import write_report

        path = write_report(self.results, Path(a.out))
        print(f"report: {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="models", help="model repository (make demo-models)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--classify-model", default="sentiment")
    p.add_argument("--teacher-model", default="sentiment-teacher")
    p.add_argument("--generate-model", default="tweetgpt")
    p.add_argument("--only", default="classify,kserve,peers,generate", type=lambda s: s.split(","))
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before each measured window")
    p.add_argument("--duration", type=float, default=12.0, help="measured seconds per point")
    p.add_argument(
        "--limit-seconds", type=float, default=2.0, help="timed seconds per raw batch size"
    )
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cancel-streams", type=int, default=1000)
    p.add_argument(
        "--mlserver-max-batch",
        type=int,
        default=None,
        help="MLServer max_batch_size (default: the model manifest's batching.max_batch)",
    )
    p.add_argument("--mlserver-max-batch-time", type=float, default=0.005)
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for `headrace serve` (repeatable), e.g. --server-arg=--intra-op-threads=1",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other phases of the results.raw.json already in --out (rerun some phases)",
    )
    p.add_argument("--skip-mlserver", action="store_true")
    p.add_argument("--skip-setup", action="store_true", help="do not run bench/setup_peers.sh")
    p.add_argument("--quick", action="store_true", help="short points (smoke run, not a report)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="build and use the tiny random test models (a smoke run of the bench itself)",
    )
    a = p.parse_args(argv)
    if a.tiny:
        from headrace.build.tiny import make_tiny_classifier, make_tiny_generator

        tiny = ROOT / ".cache" / "bench" / "tiny"
        make_tiny_classifier(tiny / "tiny-classifier" / "1")
        make_tiny_generator(tiny / "tiny-generator" / "1")
        a.models, a.generate_model = str(tiny), "tiny-generator"
        a.classify_model = a.teacher_model = "tiny-classifier"
    if a.quick:
        a.warmup, a.duration, a.limit_seconds, a.cancel_streams = 1.0, 3.0, 0.5, 200
    if not a.skip_mlserver and not a.skip_setup and "peers" in a.only:
        rc = subprocess.run(
            ["bash", str(ROOT / "bench" / "setup_peers.sh")], check=False
        ).returncode
        if rc != 0:
            print("setup_peers.sh failed: MLServer points will be missing", flush=True)
    Bench(a).run()


if __name__ == "__main__":
    main()

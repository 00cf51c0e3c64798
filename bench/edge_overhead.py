"""What the edge server costs over calling ONNX Runtime directly.

    python bench/edge_overhead.py --models models            # the demo models
    python bench/edge_overhead.py                            # tiny models, built and exported here
    python bench/edge_overhead.py --models DIR --threads 2 --n 300 --out result.json

Measured (server in a subprocess, `headrace serve --profile edge` over the first
classify and generate model of the folder alone, so client and server do not share a
GIL; raw calls in this process on the same .onnx files with the same thread settings):

  cold start        Popen -> grpc.health.v1 answers SERVING (median of --starts runs)
  rss               server VmRSS after both models are loaded and warmed; VmHWM (peak)
  classify          unary Classify p50/p90 via the SDK vs OrtEncoder.forward on the
                    pre-tokenized text (one call in flight)
  ttft              GenerateStream time to first chunk via the SDK vs OrtDecoder.prefill
  time per token    (last chunk - first chunk) / (tokens - 1) of each stream vs the mean
                    OrtDecoder.decode step (greedy, batch 1) over as many tokens
  generation total  request -> last chunk of a --tokens stream vs prefill + decode steps

Rounds interleave the SDK and raw paths so load from other processes spreads over both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from headrace.client import Client
from headrace.edge.healthcheck import check
from headrace.edge.ort_backend import OrtDecoder, OrtEncoder
from headrace.server.backends.base import BackendSpec
from headrace.server.manifest import read_manifest
from headrace.server.profiles import choose_artifact
from headrace.server.repository import scan
from headrace.server.types import Task

TEXT = "the train was on time today and the coffee was great"
PROMPT = "The weather today is"


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))  # ms


def _summary(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(_pct(xs, 50), 3), "p90_ms": round(_pct(xs, 90), 3), "n": len(xs)}


def tiny_repo(root: Path) -> Path:
    """Tiny random models with ONNX artifacts (needs the build extra: torch, transformers)."""
    from headrace.build.export import export_version
    from headrace.build.tiny import make_tiny_classifier, make_tiny_generator

    make_tiny_classifier(root / "tiny-classifier" / "1")
    make_tiny_generator(root / "tiny-generator" / "1")
    for version_dir in (root / "tiny-classifier" / "1", root / "tiny-generator" / "1"):
        export_version(version_dir)
    return root


def pick_models(models: Path) -> dict[Task, tuple[str, Path]]:
    """The first classify and generate model (newest version) with an onnxruntime artifact."""
    found: dict[Task, tuple[str, Path]] = {}
    newest: dict[str, tuple[int, Path]] = {}
    for (name, version), path in scan(models).items():
        if name not in newest or int(version) > newest[name][0]:
            newest[name] = (int(version), path)
    for name in sorted(newest):
        path = newest[name][1]
        manifest = read_manifest(path)
        if manifest.task not in found and manifest.artifact("onnxruntime") is not None:
            found[manifest.task] = (name, path)
    if len(found) < 2:
        raise SystemExit(f"{models} needs a classify and a generate model with ONNX artifacts")
    return found


def _spec(version_dir: Path, task: Task, threads: int) -> BackendSpec:
    manifest = read_manifest(version_dir)
    choice = choose_artifact(manifest, "edge", "cpu")
    return BackendSpec(
        task=task,
        backend="onnxruntime",
        path=version_dir / choice.artifact.path,
        precision=choice.artifact.precision,
        device="cpu",
        manifest=manifest,
        version_dir=version_dir,
        max_slots=manifest.batching.max_batch,
        options={"intra_op_threads": threads},
    )


def _rss_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def start_server(
    models: Path, threads: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], str, float]:
    port_file = workdir / f"port-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "headrace.server", "serve", "--models", str(models),
         "--profile", "edge", "--port", "0", "--port-file", str(port_file),
         "--intra-op-threads", str(threads), "--poll-interval", "0", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while not port_file.exists():
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.005)
    target = f"127.0.0.1:{int(port_file.read_text())}"
    while not check(target, timeout=1.0)[0]:
        time.sleep(0.005)
    return proc, target, time.perf_counter() - t0


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, help="model repository (default: tiny models)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads, server and raw")
    ap.add_argument("--n", type=int, default=300, help="rounds per latency measurement")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per streamed generation")
    ap.add_argument("--starts", type=int, default=3, help="cold starts to time")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = args.models or tiny_repo(workdir / "models")
        picked = pick_models(models)
        (cls_name, cls_dir), (gen_name, gen_dir) = picked[Task.CLASSIFY], picked[Task.GENERATE]
        # the server loads these two alone (RSS and cold start are theirs, not the folder's)
        models = workdir / "served"
        models.mkdir()
        for name, version_dir in (picked[Task.CLASSIFY], picked[Task.GENERATE]):
            (models / name).symlink_to(version_dir.parent.resolve(), target_is_directory=True)

        starts = []
        for _ in range(args.starts):
            proc, _target, seconds = start_server(models, args.threads, workdir)
            starts.append(seconds)
            stop(proc)

        encoder = OrtEncoder(_spec(cls_dir, Task.CLASSIFY, args.threads))
        decoder = OrtDecoder(_spec(gen_dir, Task.GENERATE, args.threads))
        from tokenizers import Tokenizer

        enc_tok = Tokenizer.from_file(str(cls_dir / read_manifest(cls_dir).tokenizer))
        gen_tok = Tokenizer.from_file(str(gen_dir / read_manifest(gen_dir).tokenizer))
        e = enc_tok.encode(TEXT)
        ids, mask = np.array([e.ids], dtype=np.int64), np.array([e.attention_mask], dtype=np.int64)
        prompt_ids = gen_tok.encode(PROMPT).ids

        proc, target, _ = start_server(models, args.threads, workdir)
        try:
            client = Client(target, timeout=60)
            for _ in range(20):  # warm both paths
                client.classify(TEXT, model=cls_name)
                encoder.forward(ids, mask)
            list(client.stream(PROMPT, model=gen_name, max_new_tokens=args.tokens))
            rss = _rss_kb(proc.pid)

            sdk_cls, raw_cls = [], []
            for _ in range(args.n):
                t = time.perf_counter()
                client.classify(TEXT, model=cls_name)
                sdk_cls.append(time.perf_counter() - t)
                t = time.perf_counter()
                encoder.forward(ids, mask)
                raw_cls.append(time.perf_counter() - t)

            ttft, tpot, raw_prefill, raw_tpot = [], [], [], []
            total, raw_total, first_chunk_tokens = [], [], []
            for _ in range(max(10, args.n // 10)):
                t = time.perf_counter()
                stamps, tokens = [], 0
                for chunk in client.stream(PROMPT, model=gen_name, max_new_tokens=args.tokens):
                    stamps.append(time.perf_counter())
                    if not tokens:
                        first_chunk_tokens.append(len(chunk.token_ids))
                    tokens += len(chunk.token_ids)
                ttft.append(stamps[0] - t)
                total.append(stamps[-1] - t)
                if tokens > 1:  # time per output token after the first (chunks may coalesce)
                    tpot.append((stamps[-1] - stamps[0]) / (tokens - 1))
                t = time.perf_counter()
                logits = decoder.prefill(0, prompt_ids)
                raw_prefill.append(time.perf_counter() - t)
                token = int(np.argmax(logits))
                steps = min(max(tokens, 2) - 1, decoder.max_context - len(prompt_ids))
                t = time.perf_counter()
                for _ in range(steps):
                    token = int(np.argmax(decoder.decode([0], [token])[0]))
                raw_tpot.append((time.perf_counter() - t) / steps)
                raw_total.append(raw_prefill[-1] + raw_tpot[-1] * steps)
                decoder.release(0)
            client.close()
        finally:
            stop(proc)

    result: dict[str, Any] = {
        "models": {"classify": str(cls_dir), "generate": str(gen_dir)},
        "precision": {"classify": encoder.precision, "generate": decoder.precision},
        "machine": {"cpus": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "threads": args.threads,
        "cold_start_s": {"median": round(statistics.median(starts), 3),
                         "all": [round(s, 3) for s in starts]},
        "rss_mb": {"loaded_warm": round(rss["VmRSS"] / 1024, 1),
                   "peak": round(rss["VmHWM"] / 1024, 1)},
        "classify": {"sdk": _summary(sdk_cls), "raw_ort": _summary(raw_cls)},
        "ttft": {"sdk_stream": _summary(ttft), "raw_prefill": _summary(raw_prefill)},
        "generation_total": {"sdk_stream": _summary(total), "raw": _summary(raw_total),
                             "tokens": args.tokens},
        # the detokenizer holds text back until it is whole UTF-8 (and not part of a
        # stop string), so the first chunk may carry several tokens: then ttft includes
        # their decode steps and the per-token figure below is too low
        "first_chunk_tokens_mean": round(float(np.mean(first_chunk_tokens)), 2),
        "time_per_output_token": {"sdk_stream": _summary(tpot),
                                  "raw_decode_step": _summary(raw_tpot)},
        "prompt_tokens": len(prompt_ids),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

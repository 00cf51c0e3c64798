"""The raw limit: the backend called in-process, no server, no tokenizer in the timed part.

    python -m bench.limits classify --model-dir models/sentiment --out limit.json
    python -m bench.limits generate --model-dir models/tweetgpt --out limit.json

The backend is the one `headrace serve --profile P` would load for that model version
(same artifact choice, same BackendSpec), so the server's throughput divided by this
number is the share of the backend's capacity that the serving stack delivers.

classify: backend.forward over batches of real tweets (padded to the longest text of the
batch) at batch sizes 1..64 -> texts/s per batch size (batch / median call time); the limit is the best of them.
generate: prefill B slots, then `new_tokens` decode steps for all of them at once;
tokens/s = B / (median time of one decode step), the same prompts and lengths as the load run.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import PROMPTS, newest_version, tweets, write_json


def backend_options(settings: Path | None) -> dict[str, Any]:
    """What `headrace serve --config settings` gives every backend (threads, spinning)."""
    if settings is None:
        return {}
    from headrace.server.config import load_config

    return load_config(settings).backend_options()


def _spec(
    model_dir: Path, profile: str, min_slots: int = 1, options: dict[str, Any] | None = None
) -> tuple[Any, Any, Path]:
    from headrace.server.backends.base import BackendSpec, task_options
    from headrace.server.manifest import read_manifest
    from headrace.server.profiles import choose_artifact

    version = newest_version(model_dir)
    manifest = read_manifest(version)
    choice = choose_artifact(manifest, profile, None)
    spec = BackendSpec(
        task=manifest.task,
        backend=choice.backend,
        path=(version / choice.artifact.path).resolve(),
        precision=choice.artifact.precision,
        device=choice.device,
        manifest=manifest,
        version_dir=version.resolve(),
        max_slots=max(manifest.batching.max_batch, min_slots),
        # as the server's loader gives them (a generator's own intra-op threads)
        options=task_options(options or {}, manifest.task, choice.backend),
    )
    return spec, manifest, version


def _tokenizer(version: Path, manifest: Any, max_len: int | None) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(version / manifest.tokenizer))
    if max_len:
        tok.enable_truncation(max_len)
    tok.no_padding()
    return tok


IDLE_S = 0.001  # the pause before each call of an `after_idle` figure
IDLE_CALLS = 60


def after_idle(call: Callable[[int], object]) -> float:
    """p50 ms of `call(i)` when each comes after IDLE_S of idleness, as a lone caller's does.

    Back to back, a model's weights stay in the CPU's caches; after a pause they are
    fetched again (and a sleeping core wakes): on the 2-core development box a 5-token
    prefill of the demo generator took 0.56 ms back to back, 1.33 ms after 1 ms idle,
    1.9 ms after 10 ms."""
    times = []
    for i in range(IDLE_CALLS + 5):
        time.sleep(IDLE_S)
        t0 = time.perf_counter()
        call(i)
        if i >= 5:  # the first few: warm-up
            times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def classify_limit(
    model_dir: Path,
    profile: str,
    batch_sizes: list[int],
    seconds: float,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from headrace.server.backends.registry import load_backend

    spec, manifest, version = _spec(model_dir, profile, options=options)
    tok = _tokenizer(version, manifest, manifest.limits.max_input_tokens)
    pad_id = tok.token_to_id("[PAD]") or 0
    texts = tweets(1024, seed=1)
    encoded = [e.ids for e in tok.encode_batch(texts)]
    padded: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for b in batch_sizes:
        padded[b] = []
        for start in range(0, len(encoded) - b + 1, b):
            chunk = encoded[start : start + b]
            width = max(len(ids) for ids in chunk)
            ids = np.full((b, width), pad_id, dtype=np.int64)  # [B, S]
            mask = np.zeros((b, width), dtype=np.int64)  # [B, S]
            for i, row in enumerate(chunk):
                ids[i, : len(row)] = row
                mask[i, : len(row)] = 1
            padded[b].append((ids, mask))
    backend = load_backend(spec)
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    cpu: dict[int, float] = dict.fromkeys(batch_sizes, 0.0)  # process CPU s, every thread
    try:
        for b in batch_sizes:
            for ids, mask in padded[b][:2]:  # warm-up: first calls allocate
                backend.forward(ids, mask)
        # Round-robin slices of ~0.25 s per batch size, so a moment when another process
        # takes the CPU hits every batch size alike rather than one of them.
        while any(sum(t) < seconds or len(t) < 5 for t in times.values()):
            for b in batch_sizes:
                t_b = times[b]
                if sum(t_b) >= seconds and len(t_b) >= 5:
                    continue
                slice_end = time.perf_counter() + 0.25
                while True:
                    ids, mask = padded[b][len(t_b) % len(padded[b])]
                    c0, t0 = time.process_time(), time.perf_counter()
                    backend.forward(ids, mask)
                    t1 = time.perf_counter()
                    cpu[b] += time.process_time() - c0
                    t_b.append(t1 - t0)
                    if t1 >= slice_end:
                        break
        batch1 = padded[1] if 1 in padded else []
        idle = after_idle(lambda i: backend.forward(*batch1[i % len(batch1)])) if batch1 else None
    finally:
        backend.close()
    rows = []
    for b in batch_sizes:
        # The median call: robust to another process taking the CPU for a moment.
        call_s = float(np.median(times[b]))
        rows.append(
            {
                "batch": b,
                "texts_per_s": b / call_s,
                "ms_per_call": 1e3 * call_s,
                "mean_texts_per_s": b * len(times[b]) / sum(times[b]),
                "calls": len(times[b]),
                # CPU per text (ONNX Runtime's pool threads too): what a CPU budget compares to
                "cpu_us_per_text": 1e6 * cpu[b] / (b * len(times[b])),
            }
        )
        print(f"classify limit batch={b:3d} {b / call_s:8.1f} texts/s", flush=True)
    best = max(rows, key=lambda r: r["texts_per_s"])
    return {
        "model": model_dir.name,
        "version": version.name,
        "backend": spec.backend,
        "precision": spec.precision,
        "artifact": str(spec.path.relative_to(version.resolve())),
        "options": spec.options,
        "by_batch": rows,
        "best_batch": best["batch"],
        "limit_texts_per_s": best["texts_per_s"],
        "cpu_us_per_text": best["cpu_us_per_text"],
        "batch1_after_idle_ms": idle,
    }


def generate_limit(
    model_dir: Path,
    profile: str,
    batch_sizes: list[int],
    new_tokens: int,
    repeats: int,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from headrace.server.backends.registry import load_backend
    from headrace.server.types import SamplingParams

    spec, manifest, version = _spec(model_dir, profile, max(batch_sizes), options)
    tok = _tokenizer(version, manifest, None)
    prompts = [tok.encode(p).ids for p in PROMPTS]
    backend = load_backend(spec)
    greedy = SamplingParams()
    rows = []
    try:
        for b in batch_sizes:
            slots = list(range(b))
            step_times: list[float] = []
            prefill_times: list[float] = []  # one prompt into one slot
            for rep in range(repeats + 1):  # the first round warms up and is not counted
                last = []
                for s in slots:
                    ids = prompts[(s + rep) % len(prompts)]
                    t0 = time.perf_counter()
                    logits = backend.prefill(s, ids)
                    if rep:
                        prefill_times.append(time.perf_counter() - t0)
                    last.append(backend.sample(logits, [greedy], [None], [ids])[0])
                histories: list[list[int]] = [[t] for t in last]
                for _ in range(new_tokens - 1):
                    t0 = time.perf_counter()
                    logits = backend.decode(slots, last)
                    dt = time.perf_counter() - t0
                    last = backend.sample(logits, [greedy] * b, [None] * b, histories)
                    for h, t in zip(histories, last, strict=True):
                        h.append(t)
                    if rep:
                        step_times.append(dt)
                for s in slots:
                    backend.release(s)
            # The median step: robust to another process taking the CPU for a moment.
            step_s = float(np.median(step_times))
            step_ms = 1e3 * step_s
            rows.append(
                {
                    "batch": b,
                    "step_ms": step_ms,
                    "tokens_per_s": b / step_s,
                    "mean_tokens_per_s": b * len(step_times) / sum(step_times),
                    "steps": len(step_times),
                    "prefill_ms": 1e3 * float(np.median(prefill_times)),
                }
            )
            print(
                f"decode limit batch={b:3d} step {step_ms:7.2f} ms  {rows[-1]['tokens_per_s']:8.1f} tok/s",
                flush=True,
            )

        def prefill(i: int) -> None:  # one prompt into slot 0 (TTFT's model part)
            backend.prefill(0, prompts[i % len(prompts)])
            backend.release(0)

        idle = after_idle(prefill)
    finally:
        backend.close()
    return {
        "model": model_dir.name,
        "version": version.name,
        "backend": spec.backend,
        "precision": spec.precision,
        "artifact": str(spec.path.relative_to(version.resolve())),
        "new_tokens": new_tokens,
        "by_batch": rows,
        "prefill_after_idle_ms": idle,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("task", choices=["classify", "generate"])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument(
        "--seconds", type=float, default=2.0, help="classify: timed seconds per batch size"
    )
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--settings", type=Path, help="a headrace settings TOML: its backend options (threads)"
    )
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    options = backend_options(a.settings)
    if a.task == "classify":
        batches = [int(x) for x in (a.batches or "1,2,4,8,16,32,64").split(",")]
        result = classify_limit(a.model_dir, a.profile, batches, a.seconds, options)
    else:
        batches = [int(x) for x in (a.batches or "1,16").split(",")]
        result = generate_limit(
            a.model_dir, a.profile, batches, a.new_tokens, a.repeats, options
        )
    result["pid"] = os.getpid()
    write_json(a.out, result)


if __name__ == "__main__":
    main()

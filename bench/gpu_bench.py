"""GPU measurements of the torch backend (and of the server around it), printed as JSON lines.

    python bench/gpu_bench.py --classify-model MODEL_VERSION_DIR [--server] [--out FILE]

1. classify: TorchEncoder forward throughput by batch size (fp16, fixed token length).
2. decode: one decode step of a GPT-2-small-size model (random weights, fp16) by batch size,
   eager vs CUDA graphs, and decode + on-GPU sampling.
3. server (--server): Classify through the real gRPC server on this GPU vs the in-process
   backend call, one text per call, sequential (latency) and with concurrent callers.

Needs CUDA. Figures are medians over repeats; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from headrace.server.backends.base import BackendSpec
from headrace.server.manifest import Artifact, Generation, Manifest, read_manifest
from headrace.server.types import SamplingParams, Task

RESULTS: list[dict[str, Any]] = []


def emit(**row: Any) -> None:
    row["device"] = torch.cuda.get_device_name()
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def timed(fn: Any, repeats: int, inner: int) -> float:
    """Median seconds of one call of fn over `repeats` runs of `inner` calls."""
    fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / inner)
    return statistics.median(runs)


def bench_classify(version_dir: Path, seq_len: int) -> None:
    from headrace.server.backends.torch_backend import TorchEncoder

    manifest = read_manifest(version_dir)
    art = manifest.artifact("torch")
    assert art is not None
    for graphs in (False, True):
        spec = BackendSpec(
            Task.CLASSIFY, "torch", version_dir / art.path, "fp16", "cuda", manifest, version_dir,
            options={"cuda_graphs": graphs, "graph_max_batch": 256},
        )  # fmt: skip
        _bench_encoder(TorchEncoder(spec), manifest, version_dir, seq_len, graphs)


def _bench_encoder(enc: Any, manifest: Any, version_dir: Path, seq_len: int, graphs: bool) -> None:
    vocab = enc.model.config.vocab_size
    rng = np.random.default_rng(0)
    warm = rng.integers(1000, vocab, size=(64, seq_len)).astype(np.int64)
    t_end = time.perf_counter() + 3.0  # clocks up, allocator and kernels warm
    while time.perf_counter() < t_end:
        enc.forward(warm, np.ones_like(warm))
    for batch in (1, 8, 32, 64, 128, 256):
        ids = rng.integers(1000, vocab, size=(batch, seq_len)).astype(np.int64)
        mask = np.ones_like(ids)
        sec = timed(lambda ids=ids, mask=mask: enc.forward(ids, mask), repeats=5, inner=20)
        emit(
            bench="classify_forward",
            model=str(manifest.provenance.get("base", version_dir)),
            precision="fp16",
            cuda_graphs=graphs,
            batch=batch,
            seq_len=seq_len,
            ms_per_batch=round(sec * 1e3, 3),
            texts_per_s=round(batch / sec, 1),
        )
    # a new sequence length the first time, then again: the cost of a first shape
    for seq in (17, 23, 31, 45, 63, 90, 127):
        ids = rng.integers(1000, vocab, size=(32, seq)).astype(np.int64)
        t0 = time.perf_counter()
        enc.forward(ids, np.ones_like(ids))
        first = time.perf_counter() - t0
        sec = timed(lambda ids=ids: enc.forward(ids, np.ones_like(ids)), repeats=3, inner=10)
        emit(bench="classify_first_shape", cuda_graphs=graphs, batch=32, seq_len=seq,
             ms_first_call=round(first * 1e3, 2), ms_after=round(sec * 1e3, 3))  # fmt: skip
    enc.close()


def _gpt2_small(folder: Path, max_context: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_positions=max_context)  # 124M: 12 layers, 768 hidden, 50257 vocab
    GPT2LMHeadModel(config).save_pretrained(folder / "hf")
    Manifest(
        task=Task.GENERATE,
        tokenizer="tokenizer.json",
        artifacts=(Artifact(backend="torch", path="hf", precision="fp16"),),
        generation=Generation(eos_token_id=50256, max_context=max_context),
    ).write(folder)
    return folder


def bench_decode(prompt_len: int, max_context: int, steps: int) -> None:
    from headrace.server.backends.torch_backend import TorchDecoder

    with tempfile.TemporaryDirectory() as tmp:
        folder = _gpt2_small(Path(tmp), max_context)
        manifest = read_manifest(folder)
        for graphs in (False, True):
            for batch in (1, 16, 64):
                spec = BackendSpec(
                    Task.GENERATE, "torch", folder / "hf", "fp16", "cuda", manifest, folder,
                    max_slots=batch, options={"cuda_graphs": graphs},
                )  # fmt: skip
                dec = TorchDecoder(spec)
                rng = np.random.default_rng(0)
                slots = list(range(batch))
                for s in slots:
                    dec.prefill(s, rng.integers(0, 50000, size=prompt_len).tolist())
                last = rng.integers(0, 50000, size=batch).tolist()
                # each step advances every slot; re-prefill between runs keeps lengths bounded
                step_times: list[float] = []
                sample_times: dict[bool, list[float]] = {True: [], False: []}  # by greedy
                greedy = [SamplingParams()] * batch
                sampled = [SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=i)
                           for i in range(batch)]  # fmt: skip
                gens = [np.random.default_rng(i) for i in range(batch)]
                hist: list[list[int]] = [[] for _ in range(batch)]
                first_ms = 0.0
                for i in range(steps + 5):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    logits = dec.decode(slots, last)
                    torch.cuda.synchronize()
                    t1 = time.perf_counter()
                    last = dec.sample(logits, greedy if i % 2 else sampled, gens, hist)
                    t2 = time.perf_counter()
                    if i == 0:
                        first_ms = (t1 - t0) * 1e3  # includes the graph capture, if any
                    if i >= 5:
                        step_times.append(t1 - t0)
                        sample_times[bool(i % 2)].append(t2 - t1)
                emit(
                    bench="decode_step",
                    model="gpt2-small config, random weights (124M)",
                    precision="fp16",
                    cuda_graphs=graphs,
                    batch=batch,
                    context=f"{prompt_len}..{prompt_len + steps + 5}",
                    ms_per_step=round(statistics.median(step_times) * 1e3, 3),
                    ms_first_step=round(first_ms, 1),
                    tokens_per_s=round(batch / statistics.median(step_times), 1),
                    ms_sample_greedy=round(statistics.median(sample_times[True]) * 1e3, 3),
                    ms_sample_topk_topp=round(statistics.median(sample_times[False]) * 1e3, 3),
                )
                dec.close()
                del dec
                torch.cuda.empty_cache()


def bench_server(models: Path, model_name: str, port: int) -> None:
    import grpc
    from headrace.v1 import inference_pb2 as pb
    from headrace.v1 import inference_pb2_grpc as pb_grpc

    texts = [f"the service answered request number {i} before its deadline, as usual" for i in
             range(256)]  # fmt: skip
    cmd = [sys.executable, "-m", "headrace.server", "serve", "--models", str(models),
           "--port", str(port), "--profile", "datacenter", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.InferenceStub(channel)
        deadline = time.time() + 180
        while True:
            try:
                stub.Classify(pb.ClassifyRequest(model=model_name, texts=["warm up"]), timeout=10)
                break
            except grpc.RpcError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1.0)

        def one(i: int, per_call: int = 1) -> float:
            batch = [texts[(i + j) % 256] for j in range(per_call)]
            t0 = time.perf_counter()
            stub.Classify(pb.ClassifyRequest(model=model_name, texts=batch), timeout=30)
            return time.perf_counter() - t0

        lat = [one(i) for i in range(300)][50:]
        emit(bench="server_classify_sequential", texts_per_call=1,
             p50_ms=round(statistics.median(lat) * 1e3, 3),
             p99_ms=round(float(np.percentile(lat, 99)) * 1e3, 3), command=" ".join(cmd))  # fmt: skip
        for callers in (16, 64):
            n = 3000
            with ThreadPoolExecutor(callers) as pool:
                list(pool.map(one, range(200)))
                t0 = time.perf_counter()
                lat = list(pool.map(one, range(n)))
                wall = time.perf_counter() - t0
            emit(bench="server_classify_concurrent", callers=callers, texts_per_call=1,
                 requests_per_s=round(n / wall, 1), p50_ms=round(statistics.median(lat) * 1e3, 3),
                 p99_ms=round(float(np.percentile(lat, 99)) * 1e3, 3))  # fmt: skip
        for callers in (16,):
            n = 600
            with ThreadPoolExecutor(callers) as pool:
                list(pool.map(lambda i: one(i, 32), range(50)))
                t0 = time.perf_counter()
                lat = list(pool.map(lambda i: one(i, 32), range(n)))
                wall = time.perf_counter() - t0
            emit(bench="server_classify_concurrent", callers=callers, texts_per_call=32,
                 texts_per_s=round(32 * n / wall, 1), p50_ms=round(statistics.median(lat) * 1e3, 3),
                 p99_ms=round(float(np.percentile(lat, 99)) * 1e3, 3))  # fmt: skip
        channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # the same single text through the backend alone, tokenized here as the server does
    from headrace.server.backends.torch_backend import TorchEncoder
    from tokenizers import Tokenizer

    version_dir = models / model_name / "1"
    manifest = read_manifest(version_dir)
    tok = Tokenizer.from_file(str(version_dir / manifest.tokenizer))
    spec = BackendSpec(
        Task.CLASSIFY, "torch", version_dir / "hf", "fp16", "cuda", manifest, version_dir
    )
    enc = TorchEncoder(spec)

    def direct() -> None:
        e = tok.encode(texts[0])
        ids = np.asarray([e.ids], dtype=np.int64)
        enc.forward(ids, np.ones_like(ids))

    sec = timed(direct, repeats=5, inner=100)
    emit(bench="inprocess_classify_one_text", ms=round(sec * 1e3, 3))


def profile_sampler(batch: int, vocab: int) -> None:
    """Where the time of one top-k/top-p sampling step goes (torch.profiler table)."""
    from headrace.server.backends.torch_sampling import sample_torch
    from torch.profiler import ProfilerActivity, profile

    logits = torch.randn(batch, vocab, device="cuda", dtype=torch.float16)
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=i) for i in range(batch)]
    gens = [np.random.default_rng(i) for i in range(batch)]
    hist: list[list[int]] = [[] for _ in range(batch)]
    for _ in range(5):
        sample_torch(logits, params, gens, hist)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            sample_torch(logits, params, gens, hist)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
    sec = timed(lambda: sample_torch(logits, params, gens, hist), repeats=5, inner=20)
    emit(bench="sample_topk_topp", batch=batch, vocab=vocab, ms=round(sec * 1e3, 3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classify-model", type=Path, help="a classify model version folder")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--decode", action="store_true", help="run the decode benchmark")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--server", action="store_true", help="run the server benchmark")
    ap.add_argument("--port", type=int, default=50151)
    ap.add_argument("--profile-sampler", action="store_true", help="profile one sampling step")
    ap.add_argument("--out", type=Path, help="write all rows here as JSON")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: needs CUDA", file=sys.stderr)
        return 2
    if args.classify_model:
        bench_classify(args.classify_model, args.seq_len)
    if args.profile_sampler:
        profile_sampler(64, 50257)
    if args.decode:
        bench_decode(args.prompt_len, args.max_context, args.steps)
    if args.server and args.classify_model:
        bench_server(args.classify_model.parent.parent, args.classify_model.parent.name, args.port)
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

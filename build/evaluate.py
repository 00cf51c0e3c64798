"""Measure what the pipeline wrote: quality, size and speed of every form on the same test set.

Classifier forms are run through the serving backends when they are installed
(`headrace.server.backends.registry.load_backend`: TorchEncoder, OrtEncoder),
so the card measures what will serve; a plain torch module / ONNX Runtime
session stands in otherwise (the result says which ran).

Decoder graphs are measured directly on ONNX Runtime: one KV-cache step with
a past of `past_len` tokens, at batch 1 and 16.

Threads: every runtime is pinned to `threads` intra-op threads (2 by default)
so figures compare like with like on a small CPU box.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]  # ids, mask [B, S] -> logits [B, C]


# --------------------------------------------------------------------------- metrics


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean()) if len(gold) else 0.0


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def file_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors")) or sum(
            p.stat().st_size for p in path.rglob("*") if p.is_file()
        )
    return path.stat().st_size


# --------------------------------------------------------------------------- runners


def encoder_runner(
    backend: str,
    path: Path,
    *,
    precision: str,
    threads: int = 2,
    manifest: Any = None,
    version_dir: Path | None = None,
) -> tuple[Runner, str, Callable[[], None]]:
    """-> (run(ids, mask) -> logits, what ran, close)."""
    if manifest is not None and version_dir is not None:
        try:
            from headrace.server.backends.base import BackendSpec
            from headrace.server.backends.registry import load_encoder

            spec = BackendSpec(
                task=manifest.task,
                backend=backend,
                path=Path(path).resolve(),
                precision=precision,
                device="cpu",
                manifest=manifest,
                version_dir=Path(version_dir).resolve(),
                options={"intra_op_threads": threads},
            )
            served = load_encoder(spec)
            if backend == "torch":
                import torch

                torch.set_num_threads(threads)
            return (
                served.forward,
                type(served).__module__ + "." + type(served).__name__,
                served.close,
            )
        except Exception as exc:  # backend not installed yet, or incompatible: measure directly
            from headrace.build.steps import log

            log(f"serving backend {backend!r} unavailable ({exc}); measuring directly")
    if backend == "torch":
        import torch
        from transformers import AutoModelForSequenceClassification

        torch.set_num_threads(threads)
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()

        def run_torch(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            logits: np.ndarray = out.logits.float().numpy()
            return logits

        return run_torch, "torch (transformers)", lambda: None
    session = ort_session(path, threads)

    def run_ort(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out: np.ndarray = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        return out

    return run_ort, "onnxruntime InferenceSession", lambda: None


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- generator


def lm_perplexity(model: Any, blocks: np.ndarray, *, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) of a torch causal LM over token blocks int64 [N, T]."""
    import torch
    from tqdm import tqdm

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in tqdm(range(0, len(blocks), batch_size), desc="  perplexity", leave=False):
            ids = torch.from_numpy(blocks[i : i + batch_size])
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += ids[:, 1:].numel()
    return float(np.exp(total / max(1, count)))


def torch_greedy(model: Any, prompt: Sequence[int], n: int) -> list[int]:
    """Greedy tokens from torch with its own KV cache; EOS is a token like any other."""
    import torch
    from headrace.server.backends.torch_cache import cache_keyword, output_cache

    keyword = cache_keyword(model)
    out: list[int] = []
    with torch.inference_mode():
        result = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
        for _ in range(n):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            result = model(
                input_ids=torch.tensor([[token]]), use_cache=True, **{keyword: output_cache(result)}
            )
    return out


def greedy_agreement(
    model: Any, onnx_path: Path, prompts: Sequence[Sequence[int]], n: int = 64, threads: int = 2
) -> dict[str, Any]:
    """Token-by-token agreement of ONNX greedy generation with torch's, over `n` tokens."""
    from headrace.build.export import greedy_onnx

    session = ort_session(onnx_path, threads)
    facts = decoder_facts(session)
    same = total = identical = 0
    for prompt in prompts:
        k = max(1, min(n, facts["max_context"] - len(prompt)))
        ref = torch_greedy(model, prompt, k)
        got = greedy_onnx(session, facts, prompt, k)
        same += sum(a == b for a, b in zip(ref, got, strict=True))
        total += k
        identical += int(ref == got)
    return {
        "greedy_agreement": round(same / max(1, total), 4),
        "greedy_identical": f"{identical}/{len(prompts)}",
        "greedy_tokens": n,
    }


def decoder_facts(session: Any) -> dict[str, int]:
    meta = session.get_modelmeta().custom_metadata_map
    keys = ("num_layers", "num_heads", "head_dim", "vocab_size", "max_context")
    return {k: int(meta[k]) for k in keys}


def decode_step_latency(
    onnx_path: Path,
    *,
    batch: int,
    past_len: int = 32,
    steps: int = 50,
    threads: int = 2,
) -> float:
    """p50 milliseconds of one decode step (1 new token per sequence, `past_len` cached)."""
    session = ort_session(onnx_path, threads)
    f = decoder_facts(session)
    past_len = min(past_len, f["max_context"] - 1)
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(0, f["vocab_size"], (batch, 1), dtype=np.int64),
        "attention_mask": np.ones((batch, past_len + 1), dtype=np.int64),
        "position_ids": np.full((batch, 1), past_len, dtype=np.int64),
    }
    for i in range(f["num_layers"]):
        for kv in ("key", "value"):
            shape = (batch, f["num_heads"], past_len, f["head_dim"])
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal(shape, dtype=np.float32)
    for _ in range(5):
        session.run(["logits"], feeds)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 3)


# --------------------------------------------------------------------------- versions


def evaluate_version(
    version_dir: Path,
    *,
    threads: int = 2,
    latency_samples: int = 200,
    limit: int | None = None,
    prompts: int | None = None,
    greedy_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Re-measure every artifact of a written version (classify or generate)."""
    from headrace.server.manifest import read_manifest
    from headrace.server.types import Task

    manifest = read_manifest(version_dir)
    role = str(manifest.provenance.get("role", "")) or Path(version_dir).parent.name
    if manifest.task is Task.CLASSIFY:
        from headrace.build.classifier_eval import evaluate_classifier_version

        return evaluate_classifier_version(
            version_dir, role=role, threads=threads, latency_samples=latency_samples, limit=limit
        )
    from headrace.build.generator_eval import evaluate_generator_version

    return evaluate_generator_version(
        version_dir, threads=threads, limit=limit, prompts=prompts, greedy_tokens=greedy_tokens
    )


_COMPARED = (
    "accuracy",
    "macro_f1",
    "perplexity",
    "greedy_agreement",
    "megabytes",
    "p50_ms_batch1",
    "throughput_batch32",
    "decode_ms_batch1",
    "decode_ms_batch16",
)


def compare_with_card(version_dir: Path, forms: list[dict[str, Any]]) -> list[str]:
    """Lines 'form: key measured (card: value)' for the figures the card holds."""
    from headrace.server.manifest import read_manifest

    card_forms = {f.get("form"): f for f in read_manifest(version_dir).card.get("forms", [])}
    lines = []
    for form in forms:
        old = card_forms.get(form["form"], {})
        parts = [f"{k} {form[k]} (card {old.get(k, '—')})" for k in _COMPARED if k in form]
        lines.append(f"{form['form']}: " + ", ".join(parts))
    return lines

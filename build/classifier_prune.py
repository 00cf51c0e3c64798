"""The pruning step: rank a distilled student's heads and FFN neurons (build/prune.py), find
the largest share to keep that meets the target on the command line, remove the rest, then
distil briefly to recover.

The search measures what the target names: a candidate (the student pruned to a share,
untrained: weights do not change size or speed) is exported and dynamically quantised,
and its int8 size or batch-1 latency is measured on ONNX Runtime, latency in turns with
the fp32 teacher so the speed-up holds on a loaded machine. Bisection over the share, the
share being monotone in both.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from headrace.build.data import Split
from headrace.build.steps import log


def _interleaved_p50(
    sessions: list[Any], rows: list[list[list[int]]], rounds: int = 3
) -> list[float]:
    """p50 ms at batch 1 of each ONNX Runtime session over its `rows` (the same texts, each
    session's own token ids), sessions taking turns."""
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            for row in rows[i]:
                ids = np.asarray([row], dtype=np.int64)
                feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                t0 = time.perf_counter()
                session.run(["logits"], feeds)
                times[i].append(time.perf_counter() - t0)
    return [round(1000 * statistics.median(t), 3) for t in times]


def _measure(
    candidate: Path, teacher_onnx: Path, rows: list[list[list[int]]], threads: int
) -> dict[str, float]:
    """`rows`: the timing texts as the candidate's, then as the teacher's token ids."""
    from headrace.build.evaluate import ort_session
    from headrace.build.export import export_encoder
    from headrace.build.quantize import quantize_int8

    onnx = candidate.parent / "candidate.onnx"
    export_encoder(candidate, onnx, check_texts=None)
    int8 = candidate.parent / "candidate.int8.onnx"
    quantize_int8(onnx, int8)
    sessions = [ort_session(int8, threads), ort_session(teacher_onnx, threads)]
    for s, r in zip(sessions, rows, strict=True):  # warm-up
        _interleaved_p50([s], [r[:5]], rounds=1)
    ms, teacher_ms = _interleaved_p50(sessions, rows)
    return {
        "megabytes": round(int8.stat().st_size / 1e6, 2),
        "ms": ms,
        "teacher_ms": teacher_ms,
        "speedup": round(teacher_ms / ms, 2),
    }


def search_keep(
    measure: Any, target: Any, *, lo: float = 0.05, hi: float = 1.0, iterations: int = 6
) -> tuple[float, list[dict[str, Any]]]:
    """Largest share in [lo, hi] whose `measure(share)` meets `target` (bisection; `lo` when
    none does) -> (share, every trial)."""
    trials: list[dict[str, Any]] = []

    def trial(share: float) -> bool:
        m = measure(share)
        ok = target.met(m["megabytes"], m["ms"], m["speedup"])
        trials.append({"keep": round(share, 4), **m, "meets": ok})
        log(
            f"  prune: keep {share:.3f}: {m['megabytes']} MB, {m['ms']} ms "
            f"({m['speedup']}x), {'meets' if ok else 'misses'} {target}"
        )
        return bool(ok)

    if trial(hi):
        return hi, trials
    if not trial(lo):
        return lo, trials
    good, bad = lo, hi
    for _ in range(iterations - 2):
        mid = (good + bad) / 2
        if trial(mid):
            good = mid
        else:
            bad = mid
    return good, trials


def prune_student(
    cfg: Any,
    source_hf: Path,
    teacher_export: Path,
    teacher_tokenizer: Path,
    examples: tuple[Any, ...],
    soft: np.ndarray,
    split: Split,
    out_hf: Path,
) -> dict[str, Any]:
    """Importance -> target search -> physical pruning -> recovery distillation -> out_hf."""
    import torch
    from headrace.build import prune
    from headrace.build.classifier_train import distill
    from headrace.build.distill import kd_loss
    from headrace.build.training import (
        encode_texts,
        load_tokenizer,
        pad_batch,
        save_serving_tokenizer,
    )

    target = prune.Target.parse(cfg.prune_target)
    model = prune.load_classifier(source_hf)
    tok = load_tokenizer(source_hf / "tokenizer.json", max_len=cfg.max_input_tokens)
    n = min(cfg.prune_texts, len(examples))
    rows = encode_texts(tok, [e.text for e in examples[:n]])
    soft_t = torch.from_numpy(soft[:n])
    labels = torch.tensor(split.label_ids(examples[:n]))
    order = sorted(range(n), key=lambda i: len(rows[i]))
    chunks = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    batches = [pad_batch([rows[i] for i in c]) for c in chunks]

    def loss_fn(logits: Any, b: int) -> Any:
        idx = chunks[b]
        return kd_loss(
            logits, soft_t[idx], labels[idx], temperature=cfg.temperature, alpha=cfg.alpha
        )

    start = time.perf_counter()
    heads, neurons = prune.importance(model, batches, loss_fn)
    ranked = time.perf_counter() - start
    timing = [e.text for e in split.val[:40]]
    # the teacher reads its own ids: a vocabulary-pruned student's are renumbered
    teacher_tok = load_tokenizer(teacher_tokenizer, max_len=cfg.max_input_tokens)
    timing_rows = [encode_texts(tok, timing), encode_texts(teacher_tok, timing)]
    with tempfile.TemporaryDirectory() as tmp:

        def measure(share: float) -> dict[str, float]:
            candidate = Path(tmp) / "hf"
            shutil.rmtree(candidate, ignore_errors=True)
            pruned = prune.prune_model(copy.deepcopy(model), prune.plan(heads, neurons, share))
            pruned.save_pretrained(candidate)
            shutil.copy2(source_hf / "tokenizer.json", candidate / "tokenizer.json")
            return _measure(candidate, teacher_export / "model.onnx", timing_rows, cfg.threads)

        keep, trials = search_keep(measure, target)
    prune.prune_model(model, prune.plan(heads, neurons, keep))
    shape = prune.summary(model)
    log(
        f"prune: keep {keep:.3f} of heads and FFN neurons: {shape['heads_per_layer']} heads, "
        f"{shape['ffn_per_layer']} neurons per layer"
    )
    result = distill(
        cfg,
        model,
        source_hf / "tokenizer.json",
        examples,
        soft,
        split,
        epochs=cfg.prune_epochs,
        lr=cfg.student_lr,
        seed=cfg.seed + 100,
        desc="pruned student",
    )
    model.save_pretrained(out_hf)
    save_serving_tokenizer(source_hf / "tokenizer.json", out_hf / "tokenizer.json")
    return {
        **result,
        **shape,
        "source": source_hf.parent.name,
        "target": str(target),
        "target_met": bool(any(t["meets"] and t["keep"] == round(keep, 4) for t in trials)),
        "keep": round(keep, 4),
        "search": trials,
        "importance": "first-order Taylor |sum a * dL/da| per head and FFN neuron (Michel et "
        "al. 2019), over the distillation loss, normalised per layer",
        "importance_texts": n,
        "importance_seconds": round(ranked, 1),
        "layers_kept": [],
    }

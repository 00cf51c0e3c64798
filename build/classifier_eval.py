"""Classifier forms measured on the test split: quality and throughput per form, then the
batch-1 latency of all forms together, interleaved in blocks.

Interleaving matters on a shared machine: timing the teacher for a minute and then the
student for a minute lets other load land on one of them; taking turns in short blocks
spreads it over all forms alike, so the ratios hold. Blocks rather than single texts:
switching forms on every call measures cold caches and the previous session's threads
still spinning (measured: the fp32 teacher's p50 went from about 4 ms to 15 ms).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from headrace.build.evaluate import (
    Runner,
    accuracy,
    encoder_runner,
    file_bytes,
    macro_f1,
)
from headrace.build.training import pad_batch


def evaluate_classifier_form(
    run: Runner,
    rows: Sequence[Sequence[int]],
    gold: Sequence[int],
    num_classes: int,
    *,
    batch_size: int = 32,
    pad_id: int = 0,
) -> dict[str, Any]:
    """Accuracy and macro-F1 over all `rows`, run in batches of `batch_size` texts of similar
    length (sorted, so little padding), which also gives the throughput. Returns the logits
    too (key "logits", in the order of `rows`, for comparisons)."""
    from tqdm import tqdm

    gold_arr = np.asarray(gold)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    all_logits: np.ndarray | None = None
    run(*pad_batch([rows[0]], pad_id))  # warm-up
    start = time.perf_counter()
    for i in tqdm(range(0, len(rows), batch_size), desc="  batch 32", unit="batch", leave=False):
        idx = order[i : i + batch_size]
        out = np.asarray(run(*pad_batch([rows[j] for j in idx], pad_id)), dtype=np.float32)
        if all_logits is None:
            all_logits = np.zeros((len(rows), out.shape[1]), dtype=np.float32)
        all_logits[idx] = out
    seconds = time.perf_counter() - start
    assert all_logits is not None
    pred = all_logits.argmax(-1)
    return {
        "accuracy": round(accuracy(pred, gold_arr), 4),
        "macro_f1": round(macro_f1(pred, gold_arr, num_classes), 4),
        "throughput_batch32": round(len(rows) / seconds, 1),
        "test_texts": len(rows),
        "logits": all_logits,
    }


def add_latency(
    forms: list[dict[str, Any]],
    versions: Sequence[tuple[Path, str]],
    *,
    threads: int = 2,
    samples: int = 200,
    block: int = 20,
    warmup: int = 3,
    pad_id: int = 0,
) -> None:
    """Set p50/p90 batch-1 latency on `forms` (found by name): every artifact of `versions`
    timed on the same first `samples` test texts, in blocks of `block` texts taken in
    turn by each form (each block after `warmup` untimed calls)."""
    from headrace.build.data import SPLIT_NAME, Split
    from headrace.build.training import encode_texts, load_tokenizer
    from headrace.server.manifest import read_manifest
    from tqdm import tqdm

    runners: dict[str, Runner] = {}
    rows: dict[str, list[list[int]]] = {}  # form -> its version's token rows of the same texts
    closers = []
    texts: list[str] = []
    try:
        for version_dir, role in versions:
            manifest = read_manifest(version_dir)
            if not texts:
                split = Split.load(Path(version_dir) / SPLIT_NAME)
                texts = [e.text for e in split.test[: max(1, samples)]]
            # each version with its own tokenizer: a vocabulary-pruned student's ids differ
            tok = load_tokenizer(
                Path(version_dir) / manifest.tokenizer, max_len=manifest.limits.max_input_tokens
            )
            version_rows = encode_texts(tok, texts)
            for art in manifest.artifacts:
                run, _, close = encoder_runner(
                    art.backend,
                    Path(version_dir) / art.path,
                    precision=art.precision,
                    threads=threads,
                    manifest=manifest,
                    version_dir=Path(version_dir),
                )
                runners[_form_name(role, art)] = run
                rows[_form_name(role, art)] = version_rows
                closers.append(close)
        names = list(runners)
        times: dict[str, list[float]] = {n: [] for n in names}
        starts = range(0, len(texts), block)
        for b, i in enumerate(tqdm(starts, desc="  batch 1", unit="block", leave=False)):
            for n in names[b % len(names) :] + names[: b % len(names)]:  # rotate who goes first
                run, chunk = runners[n], rows[n][i : i + block]
                for r in chunk[:warmup]:  # untimed: caches and thread pools settle on this form
                    run(*pad_batch([r], pad_id))
                for r in chunk:
                    ids, mask = pad_batch([r], pad_id)
                    t0 = time.perf_counter()
                    run(ids, mask)
                    times[n].append(time.perf_counter() - t0)
    finally:
        for close in closers:
            close()
    for form in forms:
        t = sorted(times.get(form["form"], []))
        if t:
            form["p50_ms_batch1"] = round(1000 * statistics.median(t), 3)
            form["p90_ms_batch1"] = round(1000 * t[int(0.9 * (len(t) - 1))], 3)
            form["latency_texts"] = len(t)


def _form_name(role: str, artifact: Any) -> str:
    """'student-3L int8 static (onnxruntime)': role, precision (int8: how), backend."""
    how = {"static-qdq": " static", "dynamic": " dynamic"}.get(artifact.extra.get("quantization"), "")
    return f"{role} {artifact.precision}{how} ({artifact.backend})"


def evaluate_candidates(
    versions: dict[str, Path], threads: int, latency_samples: int
) -> list[dict[str, Any]]:
    """Every form of every staged version (key -> folder), then their batch-1 latency, timed
    together in turns."""
    forms: list[dict[str, Any]] = []
    for key, folder in versions.items():
        forms += evaluate_classifier_version(folder, role=key, threads=threads, latency_samples=0)
    add_latency(forms, [(folder, key) for key, folder in versions.items()], threads=threads,
                samples=latency_samples)  # fmt: skip
    return forms


def evaluate_classifier_version(
    version_dir: Path,
    *,
    role: str = "",
    threads: int = 2,
    latency_samples: int = 200,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Every artifact of a classify version, on the test part of its own `split.json`.

    Also records each form's max |logit| difference from the version's torch form.
    `latency_samples` > 0 measures the batch-1 latency too (`add_latency`).
    """
    from headrace.build.data import SPLIT_NAME, Split
    from headrace.build.steps import log
    from headrace.build.training import encode_texts, load_tokenizer
    from headrace.server.manifest import read_manifest

    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    split = Split.load(version_dir / SPLIT_NAME)
    test = split.test[:limit] if limit else split.test
    tok = load_tokenizer(version_dir / manifest.tokenizer, max_len=manifest.limits.max_input_tokens)
    rows = encode_texts(tok, [e.text for e in test])
    gold = split.label_ids(test)
    if tuple(manifest.labels) != split.labels:
        raise ValueError(
            f"{version_dir}: manifest labels {manifest.labels} != split {split.labels}"
        )
    # torch first: the others are compared with its logits
    order = sorted(manifest.artifacts, key=lambda a: a.backend != "torch")
    reference: np.ndarray | None = None
    forms: list[dict[str, Any]] = []
    for art in order:
        name = _form_name(role or version_dir.parent.name, art)
        log(f"  evaluating {name} on {len(rows)} test texts")
        run, what, close = encoder_runner(
            art.backend,
            version_dir / art.path,
            precision=art.precision,
            threads=threads,
            manifest=manifest,
            version_dir=version_dir,
        )
        try:
            res = evaluate_classifier_form(run, rows, gold, len(split.labels))
        finally:
            close()
        logits = res.pop("logits")
        if art.backend == "torch":
            reference = logits
        size = file_bytes(version_dir / art.path)
        form = {
            "form": name,
            "model": version_dir.parent.name,
            "version": version_dir.name,
            "backend": art.backend,
            "precision": art.precision,
            "quantization": art.extra.get("quantization"),
            "path": art.path,
            "bytes": size,
            "megabytes": round(size / 1e6, 2),
            **res,
            "runtime": what,
        }
        if reference is not None and art.backend != "torch":
            form["max_abs_diff"] = float(np.max(np.abs(logits - reference)))
            form["agreement_with_torch"] = round(
                float((logits.argmax(-1) == reference.argmax(-1)).mean()), 4
            )
        forms.append(form)
    if latency_samples > 0:
        add_latency(forms, [(version_dir, role)], threads=threads, samples=latency_samples)
    return forms

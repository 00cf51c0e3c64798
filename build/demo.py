"""`headrace build demo`: the default demo models, built once into a model repository.

    sentiment/1          the distilled student (int8 ONNX served on the edge, + fp32 ONNX, hf/)
    sentiment-teacher/1  the fine-tuned fp32 teacher (hf/, model.onnx, model.int8.onnx)
    tweetgpt/1           a small GPT trained on tweets (hf/, model.onnx, model.int8.onnx)

A second run finds them up to date and returns at once; an interrupted run resumes
from its last finished step (OUT/../.cache/build/).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from headrace.build.classifier import ClassifierConfig
from headrace.build.generator import GeneratorConfig
from headrace.build.steps import fmt_seconds, log

# --quick: the whole pipeline on a small slice, short training (CI smoke run)
QUICK_CLASSIFIER: dict[str, Any] = {
    "limit": 600,
    "teacher_epochs": 0.5,
    "teacher_eval_every": 0.25,
    "teacher_eval_texts": None,
    "plateau_patience": 1,
    "student_layers": (1,),
    "distill_examples": None,
    "student_epochs": 1.0,
    "prune_target": "1.5x",
    "prune_epochs": 0.5,
    "prune_texts": 64,
    "calibration_texts": 32,
    "max_input_tokens": 64,
    "latency_samples": 20,
}
QUICK_GENERATOR: dict[str, Any] = {
    "limit": 1500,
    "vocab_size": 1000,
    "teacher_steps": 30,
    "student_steps": 10,
    "n_embd": 64,
    "n_layer": 2,
    "student_layers": 1,
    "batch_size": 8,
    "block_size": 64,
    "prompts": 2,
    "greedy_tokens": 16,
}


def demo_configs(
    out: Path, *, quick: bool = False, force: bool = False, threads: int = 2
) -> tuple[ClassifierConfig, GeneratorConfig]:
    c_extra: dict[str, Any] = dict(QUICK_CLASSIFIER) if quick else {}
    g_extra: dict[str, Any] = dict(QUICK_GENERATOR) if quick else {}
    return (
        ClassifierConfig(out=Path(out), threads=threads, force=force, **c_extra),
        GeneratorConfig(out=Path(out), threads=threads, force=force, **g_extra),
    )


def build_demo(
    out: Path,
    *,
    quick: bool = False,
    force: bool = False,
    threads: int = 2,
    only: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Build whatever of the demo models is missing or stale; returns their cards."""
    from headrace.build import classifier, generator

    start = time.perf_counter()
    c_cfg, g_cfg = demo_configs(out, quick=quick, force=force, threads=threads)
    cards: dict[str, dict[str, Any]] = {}
    if only in (None, "classifier"):
        cards[c_cfg.name] = classifier.build_classifier(c_cfg)
    if only in (None, "generator"):
        cards[g_cfg.name] = generator.build_generator(g_cfg)
    log(f"demo models in {out} ready ({fmt_seconds(time.perf_counter() - start)})")
    return cards

"""`headrace build generator`: its flags and command (argparse only at import, like cli.py)."""

from __future__ import annotations

import argparse
from typing import Any


def generator_parser(sub: Any) -> None:
    from headrace.build.cli import _common
    from headrace.build.training import add_train_precision_flag

    p = sub.add_parser(
        "generator",
        help="train a BPE tokenizer and a small GPT from scratch, distill, export, evaluate",
        description="Byte-level BPE tokenizer -> GPT-2 causal LM trained from scratch -> distilled "
        "student -> KV-cache ONNX decoder -> int8; held-out perplexity, greedy agreement with "
        "torch and decode-step latency in the card. Resumable.",
    )
    _common(p, "tweetgpt")
    for flag, kind, what in (
        ("--teacher-steps", int, "teacher training steps (default 600)"),
        ("--student-steps", int, "student distillation steps (default 0: none)"),
        ("--vocab-size", int, "BPE vocabulary (default 8192)"),
        ("--n-embd", int, "teacher width (default 256)"),
        ("--n-layer", int, "teacher layers (default 4)"),
        ("--n-head", int, "attention heads (default 4)"),
        ("--block-size", int, "context (default 128)"),
        ("--batch-size", int, "blocks a step (default 16)"),
        ("--teacher-lr", float, "peak learning rate (default 2e-3)"),
        ("--student-layers", int, "student layers (default 2)"),
    ):
        p.add_argument(flag, type=kind, default=None, help=what)
    add_train_precision_flag(p, "--precision")  # --precision: the earlier name, kept working
    p.add_argument(
        "--serve",
        choices=("teacher", "student", "auto"),
        default=None,
        help="which model the version holds (default auto: the student unless its "
        "perplexity is more than 5%% worse than the teacher's)",
    )
    p.set_defaults(func=cmd_generator)


def cmd_generator(args: argparse.Namespace) -> int:
    from headrace.build.cli import _config_args, _prepare_process, _print_summary

    _prepare_process()
    from headrace.build.demo import QUICK_GENERATOR
    from headrace.build.generator import GeneratorConfig, build_generator

    keys = (
        "limit",
        "teacher_steps",
        "student_steps",
        "vocab_size",
        "n_embd",
        "n_layer",
        "n_head",
        "block_size",
        "batch_size",
        "teacher_lr",
        "train_precision",
        "student_layers",
        "serve",
    )
    cfg = GeneratorConfig(**_config_args(args, keys, QUICK_GENERATOR))
    card = build_generator(cfg)
    _print_summary(card)
    return 0

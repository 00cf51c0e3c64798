"""The classifier's model card: every form's figures beside the teacher's, the served form
chosen by rule, the targets, the teacher's training curve, and the trade-off plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headrace.build.card import environment, target
from headrace.build.plot import PLOT_NAME, tradeoff_plot
from headrace.build.vocab import FULL_VOCAB

SERVED_RULE = (
    "Served: the fastest ONNX Runtime form at batch 1 (p50) among the students whose test "
    "accuracy is at least {floor:.0%} of the fp32 teacher's; where none is, the most accurate "
    "student form."
)


def _find(forms: list[dict[str, Any]], model: str, backend: str, precision: str) -> dict[str, Any]:
    return next(
        f
        for f in forms
        if f["model"] == model
        and f["backend"] == backend
        and f["precision"] == precision
        and not f.get("quantization")
    )


def _pruning_target(key: str, pruned: dict[str, Any], forms: list[dict[str, Any]]) -> Any:
    """Judged on the evaluation's dynamic-int8 figures (the search timed an untrained
    candidate at another moment; both are shown)."""
    from headrace.build.prune import Target

    share = f"keeps {pruned['keep']:.1%} of heads and FFN neurons"
    dyn = next(
        (
            f
            for f in forms
            if f["model"] == key
            and f["backend"] == "onnxruntime"
            and f.get("quantization") == "dynamic"
        ),
        None,
    )
    if dyn is None or not dyn.get("p50_ms_batch1"):
        return target(f"pruned student meets the pruning target {pruned['target']}", share, False)
    speedup = float(dyn.get("speedup_vs_teacher") or 0.0)
    met = Target.parse(pruned["target"]).met(dyn["megabytes"], dyn["p50_ms_batch1"], speedup)
    search = "met" if pruned["target_met"] else "not met"
    return target(
        f"pruned student (int8 dynamic) meets the pruning target {pruned['target']}",
        f"{share}; evaluation: {dyn['megabytes']} MB, {dyn['p50_ms_batch1']} ms, "
        f"{speedup:g}x (the search: {search})",
        met,
    )


def choose(forms: list[dict[str, Any]], teacher_accuracy: float, floor: float) -> dict[str, Any]:
    """The served form (SERVED_RULE) among the students' ONNX Runtime forms (a full-vocabulary
    copy is a reference, not a candidate)."""
    pool = [
        f
        for f in forms
        if f["model"] != "teacher"
        and not f["model"].endswith(FULL_VOCAB)
        and f["backend"] == "onnxruntime"
        and f.get("p50_ms_batch1")
    ]
    keeping = [f for f in pool if f["accuracy"] >= floor * teacher_accuracy]
    if keeping:
        return min(keeping, key=lambda f: f["p50_ms_batch1"])
    return max(pool, key=lambda f: (f["accuracy"], -f["p50_ms_batch1"]))


def vocabulary_rows(forms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each form of a vocabulary-pruned student beside its full-vocabulary copy's."""
    by_name = {f["form"]: f for f in forms}
    rows = []
    for full in forms:
        if not full["model"].endswith(FULL_VOCAB):
            continue
        model = full["model"].removesuffix(FULL_VOCAB)
        pruned = by_name.get(full["form"].replace(full["model"], model, 1))
        if pruned is None:
            continue
        rows.append(
            {
                "form": pruned["form"],
                "megabytes_full": full["megabytes"],
                "megabytes": pruned["megabytes"],
                "megabytes_saved": round((full["bytes"] - pruned["bytes"]) / 1e6, 2),
                "bytes_full": full["bytes"],
                "bytes": pruned["bytes"],
                "accuracy_full": full["accuracy"],
                "accuracy": pruned["accuracy"],
                "p50_ms_full": full.get("p50_ms_batch1"),
                "p50_ms": pruned.get("p50_ms_batch1"),
            }
        )
    return rows


def classifier_card(
    cfg: Any,
    data: dict[str, Any],
    trained: dict[str, dict[str, Any]],
    exports: dict[str, dict[str, Any]],
    forms: list[dict[str, Any]],
    plot_dir: Path,
) -> tuple[dict[str, Any], Path]:
    """-> (card, the plot's path)."""
    t_onnx = _find(forms, "teacher", "onnxruntime", "fp32")
    t_acc, t_ms, t_bytes = t_onnx["accuracy"], t_onnx["p50_ms_batch1"], t_onnx["bytes"]
    for f in forms:  # the trade-off, every form against the fp32 teacher on ORT
        f["accuracy_vs_teacher"] = round(f["accuracy"] / t_acc, 4) if t_acc else None
        f["size_vs_teacher"] = round(f["bytes"] / t_bytes, 4)
        if f.get("p50_ms_batch1"):
            f["speedup_vs_teacher"] = float(f"{t_ms / f['p50_ms_batch1']:.3g}")
    served = choose(forms, t_acc, cfg.accuracy_floor)
    acc_ratio, size_ratio = served["accuracy_vs_teacher"], served["size_vs_teacher"]
    speedup = served["speedup_vs_teacher"]
    teacher = trained["teacher"]
    worst_diff = max(float(e["onnx"]["max_abs_diff"]) for e in exports.values())
    targets = [
        target(
            "teacher trained until its validation accuracy plateaued",
            f"{'plateaued' if teacher['plateaued'] else 'stopped at the epoch limit'} at "
            f"epoch {teacher['stopped_at_epoch']}; kept epoch {teacher['kept']['epoch']} "
            f"(validation {teacher['kept']['val_accuracy']:.4f})",
            teacher["plateaued"],
        ),
        target(
            f"served student accuracy >= {cfg.accuracy_floor:.0%} of the fp32 teacher's",
            f"{acc_ratio:.1%} ({served['accuracy']:.4f} vs {t_acc:.4f})",
            acc_ratio >= cfg.accuracy_floor,
        ),
        target(
            "served student size <= 1/6 of the fp32 teacher's",
            f"{size_ratio:.3f} ({served['megabytes']} MB vs {t_onnx['megabytes']} MB)",
            size_ratio <= 1 / 6,
        ),
        target(
            "served student p50 latency (batch 1) >= 8x faster than the fp32 teacher on ORT",
            f"{speedup:.1f}x ({served['p50_ms_batch1']} ms vs {t_ms} ms)",
            speedup >= 8.0,
        ),
        target(
            "ONNX fp32 vs torch: max abs logit diff <= 1e-4 (export check)",
            f"{worst_diff:.2e}",
            worst_diff <= 1e-4,
        ),
    ]
    pruned_key = next((k for k in trained if k.startswith("pruned-")), None)
    pruned = trained[pruned_key] if pruned_key else None
    if pruned_key is not None and pruned is not None:
        targets.append(_pruning_target(pruned_key, pruned, forms))
    vocab = next((v["vocabulary"] for v in trained.values() if v.get("vocabulary")), None)
    if vocab is not None:
        held = vocab["held_out"]
        targets.append(
            target(
                "vocabulary pruning adds no [UNK] on the held-out texts",
                f"{held['unk_full']} -> {held['unk_pruned']} [UNK] pieces in {held['texts']} "
                f"texts ({held['texts_split_differently']} split into other pieces)",
                held["unk_pruned"] <= held["unk_full"],
            )
        )
    curve = [(p["epoch"], p["val_accuracy"]) for p in teacher["curve"]]
    plot = tradeoff_plot(
        plot_dir / PLOT_NAME,
        forms,
        quality="accuracy",
        quality_label="test accuracy",
        latency="p50_ms_batch1",
        latency_label="p50 latency, batch 1 (ms, log)",
        served=served["form"],
        floor=cfg.accuracy_floor * t_acc,
        curve=curve,
        title=f"{cfg.name}: every form on {served['test_texts']} test texts "
        f"(dotted: {cfg.accuracy_floor:.0%} of the teacher)",
    )
    headline = {
        k: served[k]
        for k in ("accuracy", "macro_f1", "megabytes", "p50_ms_batch1", "throughput_batch32")
    }
    base = data["baselines"]
    t_torch = _find(forms, "teacher", "torch", "fp32")
    vocab_rows = vocabulary_rows(forms)
    vocab_line = ""
    if vocab is not None and vocab_rows:
        # the served form's own row, else the same kind of form of the smallest student
        kind = served["form"].split(" ", 1)[1]
        row = next((r for r in vocab_rows if r["form"].endswith(kind)), vocab_rows[0])
        vocab_line = (
            f" Students keep the {vocab['tokens_after']:,} of {vocab['tokens_before']:,} word "
            f"pieces the training split uses: {row['form']} {row['megabytes']} MB against "
            f"{row['megabytes_full']} MB with the full vocabulary (accuracy {row['accuracy']:.4f} "
            f"vs {row['accuracy_full']:.4f})."
        )
    return {
        "summary": (
            f"Sentiment classifier distilled (and structurally pruned) from an "
            f"all-MiniLM-L6-v2 teacher fine-tuned until its validation accuracy plateaued; "
            f"served as {served['form']}. Every form was measured on the same "
            f"{served['test_texts']} held-out test texts with {cfg.threads} threads. Teacher: "
            f"accuracy {t_torch['accuracy']:.4f}, macro-F1 {t_torch['macro_f1']:.4f}; "
            f"baselines: majority class {base['majority']['accuracy']:.4f} (macro-F1 "
            f"{base['majority']['macro_f1']:.4f}), bag-of-words logistic regression "
            f"{base['bow_logreg']['accuracy']:.4f} (macro-F1 {base['bow_logreg']['macro_f1']:.4f})."
            + vocab_line
        ),
        "served": {
            "form": served["form"],
            "model": served["model"],
            "path": served["path"],
            "rule": SERVED_RULE.format(floor=cfg.accuracy_floor),
        },
        "headline": {"form": served["form"], **headline},
        **headline,
        "teacher_accuracy": t_torch["accuracy"],
        "teacher_macro_f1": t_torch["macro_f1"],
        "baselines": base,
        "plot": PLOT_NAME,
        "forms": forms,
        "vocabulary_pruning": (
            {
                **{k: v for k, v in vocab.items() if k != "held_out"},
                **{f"held_out_{k}": v for k, v in vocab["held_out"].items()},
                "forms": vocab_rows,
            }
            if vocab is not None
            else None
        ),
        "targets": targets,
        "targets_met": all(t["met"] for t in targets),
        "teacher_curve": teacher["curve"],
        "data": {k: v for k, v in data.items() if k != "baselines"},
        "training": {
            **{
                k: {kk: vv for kk, vv in v.items() if kk not in ("curve", "search")}
                for k, v in trained.items()
            },
            "pruning_search": pruned["search"] if pruned is not None else None,
            "seed": cfg.seed,
            "max_input_tokens": cfg.max_input_tokens,
            "distillation": {
                "examples": cfg.distill_examples,
                "epochs": cfg.student_epochs,
                "lr": cfg.student_lr,
                "temperature": cfg.temperature,
                "alpha_soft": cfg.alpha,
            },
        },
        "export": {
            key: {
                "onnx_max_abs_diff": e["onnx"].get("max_abs_diff"),
                "onnx_optimized": e["onnx"].get("optimized"),
                "int8_dynamic_ratio": e["int8"].get("ratio"),
                "int8_static": {k: v for k, v in e["int8_static"].items() if k != "path"},
            }
            for key, e in exports.items()
        },
        "environment": environment(cfg.threads),
        "notes": [
            SERVED_RULE.format(floor=cfg.accuracy_floor),
            f"Teacher: fine-tuned for at most {cfg.teacher_epochs} epochs (AdamW, lr "
            f"{cfg.teacher_lr}, batch {cfg.batch_size}, word embeddings frozen: "
            f"{cfg.freeze_embeddings}); validation accuracy on {teacher['validation_texts']} "
            f"texts every {cfg.teacher_eval_every} epoch, stopped once {cfg.plateau_patience} "
            f"measurements in a row gained less than {cfg.plateau_delta:.1%} over the best "
            "before them; the best measurement's weights are kept (the curve is in the plot "
            "and under teacher_curve).",
            "Students student-NL keep N of the teacher's layers (DistilBERT-style, evenly "
            f"spread) at full width, distilled on the teacher's cached logits (KL at "
            f"T={cfg.temperature}, weight {cfg.alpha}) plus the hard labels.",
            "pruned-NL: the student-NL with attention heads and FFN neurons removed "
            "physically (smaller matrices), ranked by first-order importance |sum a dL/da| "
            "(Michel et al. 2019) on the distillation loss, normalised per layer, one ranking "
            "across layers; the share kept is the largest that meets the target "
            f"`--prune-target {cfg.prune_target}` (measured by exporting and timing each "
            f"candidate), then {cfg.prune_epochs} epoch(s) of distillation to recover.",
            "int8 dynamic: ONNX Runtime dynamic quantisation (weights int8 per channel, "
            "activations quantised at run time) of the ORT-fused fp32 graph. int8 static: QDQ "
            "(int8 weights per channel and activations, symmetric scales) of a plain export, "
            f"calibrated (99.999th percentile) on {cfg.calibration_texts} training texts the "
            "students were not distilled on; the same file is the input of the TensorRT int8 "
            "engine.",
            f"Latency: p50 over the first {cfg.latency_samples} test texts one at a time "
            "(unpadded, batch 1), every form in turn in blocks of 20 texts (3 untimed calls "
            "first), so load from other processes falls on all forms alike. Throughput: the "
            "test set in batches of 32 texts of similar length. The load average when the "
            "card was written is under 'Measured on'.",
            "Vocabulary pruning (student-NL, pruned-NL): each student keeps only the word "
            "pieces the training split's texts produce, the special tokens and every "
            "single-character piece (c and ##c), renumbered in their old order; its "
            "word-embedding matrix is sliced to those rows and its tokenizer.json is its own. "
            "On the training texts the pieces, and so the logits, are the same as with the full "
            f"vocabulary; held-out words may split into other pieces. The rows ending {FULL_VOCAB}"
            " are the smallest student with its full vocabulary put back (the rows it was "
            "pruned from, taken from the teacher): the same weights, measured alike, so the "
            "difference is the vocabulary's (table 'Vocabulary pruning').",
            "A pruned student has no torch form in its manifest: its layers differ in width, "
            "which transformers' loaders cannot express; its ONNX forms carry the shapes.",
        ],
        "reproduce": "headrace build evaluate "
        + " ".join(f"{cfg.out}/{n}/{cfg.version}" for n in (cfg.teacher_name, cfg.name)),
    }, plot

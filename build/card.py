"""Model cards: the measured figures, as JSON in the manifest (`card`) and as MODEL_CARD.md.

A card is a plain dict so it round-trips through headrace.json unchanged:

    {
      "model": "sentiment", "summary": "...",
      "headline": {"accuracy": 0.76, ...},         # the served form's figures
      "forms": [{"form": "student int8 (onnxruntime)", "accuracy": ..., ...}, ...],
      "targets": [{"target": "...", "value": "...", "met": true}, ...],
      "data": {...}, "training": {...}, "export": {...}, "environment": {...},
      "notes": ["..."]
    }
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

CARD_NAME = "MODEL_CARD.md"

# form table columns: key -> header
_FORM_COLUMNS = {
    "form": "form",
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "perplexity": "perplexity",
    "greedy_agreement": "greedy agreement",
    "accuracy_vs_teacher": "vs teacher",
    "megabytes": "size MB",
    "size_vs_teacher": "size vs teacher",
    "p50_ms_batch1": "p50 ms (batch 1)",
    "speedup_vs_teacher": "speed-up",
    "throughput_batch32": "texts/s (batch 32)",
    "decode_ms_batch1": "decode step ms (batch 1)",
    "decode_ms_batch16": "decode step ms (batch 16)",
    "max_abs_diff": "max abs diff",
    "runtime": "measured with",
}

_VOCAB_COLUMNS = {
    "form": "form (pruned vocabulary)",
    "megabytes_full": "MB, full vocabulary",
    "megabytes": "MB, pruned",
    "megabytes_saved": "MB saved",
    "accuracy_full": "accuracy, full",
    "accuracy": "accuracy, pruned",
    "p50_ms_full": "p50 ms, full",
    "p50_ms": "p50 ms, pruned",
}


def environment(threads: int) -> dict[str, Any]:
    import onnxruntime
    import torch

    try:
        import psutil

        cpus = psutil.cpu_count(logical=True)
    except ImportError:  # pragma: no cover
        cpus = None
    return {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "logical_cpus": cpus,
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: dict[str, str]) -> list[str]:
    used = [k for k in columns if any(k in r for r in rows)]
    lines = [
        "| " + " | ".join(columns[k] for k in used) + " |",
        "|" + "|".join("---" for _ in used) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in used) + " |" for r in rows]
    return lines


def _kv(data: dict[str, Any]) -> list[str]:
    out = []
    for key, value in data.items():
        text = json.dumps(value) if isinstance(value, dict | list) else _cell(value)
        out.append(f"- **{key}**: {text}")
    return out


def render_markdown(card: dict[str, Any]) -> str:
    lines = [f"# Model card: {card.get('model', 'model')}", ""]
    if card.get("summary"):
        lines += [str(card["summary"]), ""]
    if isinstance(card.get("served"), dict):
        lines += [f"**Served: {card['served']['form']}.** {card['served'].get('rule', '')}", ""]
    if card.get("forms"):
        lines += ["## Measured forms: the trade-off", ""]
        lines += _table(card["forms"], _FORM_COLUMNS)
        lines += [""]
    if isinstance(card.get("vocabulary_pruning"), dict):
        vocab = card["vocabulary_pruning"]
        lines += ["## Vocabulary pruning", ""]
        lines += [
            f"{vocab['tokens_before']:,} -> {vocab['tokens_after']:,} word pieces (those of "
            f"{vocab['texts']:,} training texts, plus specials and "
            f"{vocab['single_character_pieces']:,} single characters); on "
            f"{vocab['held_out_texts']:,} held-out texts [UNK] {vocab['held_out_unk_full']} -> "
            f"{vocab['held_out_unk_pruned']}, {vocab['held_out_texts_split_differently']:,} "
            "texts split into other pieces. Each form with the pruned vocabulary beside the "
            "same model with the full one:",
            "",
        ]
        lines += _table(vocab.get("forms", []), _VOCAB_COLUMNS)
        lines += [""]
    if card.get("plot"):
        lines += [f"![quality against latency and size, every form]({card['plot']})", ""]
    if card.get("baselines"):
        rows = [{"baseline": k, **v} for k, v in card["baselines"].items() if isinstance(v, dict)]
        lines += ["## Baselines (test split)", ""]
        lines += _table(
            rows, {"baseline": "baseline", "accuracy": "accuracy", "macro_f1": "macro-F1"}
        )
        lines += [""]
    if card.get("teacher_curve"):
        lines += ["## Teacher: validation accuracy against epochs", ""]
        lines += _table(
            card["teacher_curve"],
            {
                "epoch": "epoch",
                "val_accuracy": "accuracy",
                "val_macro_f1": "macro-F1",
                "train_loss": "train loss",
            },
        )
        lines += [""]
    if card.get("targets"):
        lines += ["## Targets", ""]
        lines += _table(card["targets"], {"target": "target", "value": "measured", "met": "met"})
        lines += [""]
    for section, title in (
        ("data", "Data"),
        ("training", "Training"),
        ("export", "Export checks"),
        ("environment", "Measured on"),
    ):
        if card.get(section):
            lines += [f"## {title}", "", *_kv(card[section]), ""]
    if card.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in card["notes"]], ""]
    if card.get("reproduce"):
        lines += ["## Reproduce", "", "```", str(card["reproduce"]), "```", ""]
    return "\n".join(lines)


def write_card(version_dir: Path, card: dict[str, Any]) -> Path:
    path = Path(version_dir) / CARD_NAME
    path.write_text(render_markdown(card))
    return path


def target(name: str, value: Any, met: bool) -> dict[str, Any]:
    return {"target": name, "value": value, "met": bool(met)}

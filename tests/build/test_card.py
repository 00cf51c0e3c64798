from __future__ import annotations

import dataclasses
from pathlib import Path

from headrace.build.card import CARD_NAME, render_markdown, target, write_card
from headrace.server.manifest import read_manifest

CARD = {
    "model": "m",
    "summary": "A model.",
    "forms": [
        {
            "form": "teacher fp32 (torch)",
            "accuracy": 0.78,
            "megabytes": 90.9,
            "p50_ms_batch1": 12.0,
        },
        {
            "form": "student int8 (onnxruntime)",
            "accuracy": 0.76,
            "megabytes": 17.5,
            "p50_ms_batch1": 0.81,
            "max_abs_diff": 2e-5,
        },
    ],
    "targets": [target("size <= 1/4", "0.19", True), target("speed >= 5x", "3.1x", False)],
    "data": {"rows": 10, "labels": ["a", "b"]},
    "notes": ["measured on 2 threads"],
    "reproduce": "headrace build evaluate m/1",
}


def test_markdown_has_the_forms_and_targets() -> None:
    text = render_markdown(CARD)
    assert text.startswith("# Model card: m")
    assert "| teacher fp32 (torch) | 0.78 | 90.9 | 12 | — |" in text
    assert "| student int8 (onnxruntime) | 0.76 | 17.5 | 0.81 | 2.0e-05 |" in text
    assert "| speed >= 5x | 3.1x | no |" in text
    assert '- **labels**: ["a", "b"]' in text
    assert "headrace build evaluate m/1" in text


def test_card_round_trips_through_the_manifest(model_repo: Path) -> None:
    version = model_repo / "tiny-classifier" / "1"
    manifest = read_manifest(version)
    dataclasses.replace(manifest, card=CARD).write(version)
    write_card(version, CARD)
    assert read_manifest(version).card == CARD
    assert (version / CARD_NAME).read_text() == render_markdown(CARD)


def test_markdown_has_the_vocabulary_pruning_table() -> None:
    vocab = {
        "tokens_before": 30522,
        "tokens_after": 18116,
        "texts": 29785,
        "single_character_pieces": 1994,
        "held_out_texts": 7448,
        "held_out_unk_full": 184,
        "held_out_unk_pruned": 184,
        "held_out_texts_split_differently": 816,
        "forms": [
            {
                "form": "student-1L int8 dynamic (onnxruntime)",
                "megabytes_full": 13.91,
                "megabytes": 9.14,
                "megabytes_saved": 4.77,
                "accuracy_full": 0.735,
                "accuracy": 0.734,
            }
        ],
    }
    text = render_markdown({**CARD, "vocabulary_pruning": vocab})
    assert "## Vocabulary pruning" in text and "30,522 -> 18,116 word pieces" in text
    assert "[UNK] 184 -> 184, 816 texts split" in text
    assert "| student-1L int8 dynamic (onnxruntime) | 13.91 | 9.14 | 4.77 | 0.735 | 0.734 |" in text
    assert "## Vocabulary pruning" not in render_markdown({**CARD, "vocabulary_pruning": None})


def test_the_pruning_target_is_judged_on_the_evaluated_form() -> None:
    from headrace.build.classifier_card import _pruning_target

    pruned = {"target": "9x", "keep": 0.05, "target_met": True}

    def forms(speedup: float) -> list[dict[str, object]]:
        return [
            {
                "model": "pruned-3L",
                "backend": "onnxruntime",
                "quantization": "static-qdq",
                "megabytes": 8.3,
                "p50_ms_batch1": 0.5,
                "speedup_vs_teacher": 20.0,
            },
            {
                "model": "pruned-3L",
                "backend": "onnxruntime",
                "quantization": "dynamic",
                "megabytes": 7.8,
                "p50_ms_batch1": 0.95,
                "speedup_vs_teacher": speedup,
            },
        ]

    # the search found 9x on an untrained candidate; the evaluation measured 7.7x: not met
    slow = _pruning_target("pruned-3L", pruned, forms(7.73))
    assert slow["met"] is False
    assert "7.73x" in slow["value"] and "the search: met" in slow["value"]
    assert _pruning_target("pruned-3L", pruned, forms(9.5))["met"] is True
    size = _pruning_target("pruned-3L", {**pruned, "target": "8mb"}, forms(1.0))
    assert size["met"] is True
    assert _pruning_target("pruned-3L", pruned, [])["met"] is False

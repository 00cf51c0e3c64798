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

"""Small synthetic corpora for the build pipeline tests."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

WORDS = {
    "positive": ["love", "great", "wonderful", "happy", "best", "thanks"],
    "negative": ["hate", "awful", "terrible", "delayed", "worst", "rude"],
    "neutral": ["flight", "today", "gate", "seat", "the", "weather"],
}


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["negative", "neutral", "positive"][i % 3]
        words = [rng.choice(WORDS[label]) for _ in range(rng.randint(3, 8))]
        words += [rng.choice(WORDS["neutral"]) for _ in range(2)]
        rows.append((" ".join(words) + f" #{i}", label))
    return rows


@pytest.fixture()
def labelled_csv(tmp_path: Path) -> Path:
    """150 labelled texts (3 balanced labels) in a UTF-8 CSV with extra columns."""
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "review", "stars"])
        for i, (text, label) in enumerate(synthetic_rows(150)):
            w.writerow([i, text, label])
    return path


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(t for t, _ in synthetic_rows(200)) + "\n", encoding="utf-8")
    return path

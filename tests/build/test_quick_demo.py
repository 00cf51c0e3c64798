"""The real pipeline on the real base model and tweets, on a small slice (`--quick`).

Marked `slow` (about a minute or two on 2 cores): select it with `pytest -m slow tests/build`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from headrace.build.card import CARD_NAME
from headrace.server.manifest import read_manifest
from headrace.server.types import Task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _demo(out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "headrace.build", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=380,
        env=env,
        check=False,
    )


def test_quick_demo_builds_every_model_then_returns_at_once(tmp_path: Path) -> None:
    out = tmp_path / "models"
    first = _demo(out)
    assert first.returncode == 0, first.stderr[-3000:]
    sentiment = read_manifest(out / "sentiment" / "1")
    teacher = read_manifest(out / "sentiment-teacher" / "1")
    gpt = read_manifest(out / "tweetgpt" / "1")
    assert sentiment.task is Task.CLASSIFY and gpt.task is Task.GENERATE
    assert sentiment.labels == ("negative", "neutral", "positive") == teacher.labels
    served = sentiment.card["served"]
    assert sentiment.artifact("onnxruntime").path == served["path"]
    # teacher, student-1L and its full-vocabulary copy: 4 forms each; pruned-1L: 3 (no torch)
    assert len(sentiment.card["forms"]) == 15 and len(gpt.card["forms"]) == 6
    s_int8 = next(
        f for f in sentiment.card["forms"] if f["form"] == "student-1L int8 dynamic (onnxruntime)"
    )
    majority = sentiment.card["baselines"]["majority"]["accuracy"]
    assert s_int8["accuracy"] > majority - 0.15
    assert s_int8["bytes"] < 0.25 * teacher.card["forms"][0]["bytes"]
    assert sentiment.card["teacher_curve"] and (out / "sentiment" / "1" / "tradeoff.png").exists()
    assert all(
        f.get("max_abs_diff", 0.0) < 1e-4
        for f in sentiment.card["forms"]
        if f["precision"] == "fp32"
    )
    assert gpt.card["targets_met"], gpt.card["targets"]
    for name in ("sentiment", "sentiment-teacher", "tweetgpt"):
        assert (out / name / "1" / CARD_NAME).exists()

    second = _demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("up to date") == 2, second.stderr
    assert "running" not in second.stderr

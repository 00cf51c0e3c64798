from __future__ import annotations

from pathlib import Path

import pytest
from headrace.build.steps import Plan, read_step


def _run(folder: Path, params: dict, calls: list[str]) -> dict:
    plan = Plan(["make"], log=lambda _: None)
    with plan.step(folder, "make", params, outputs=["out.txt"]) as s:
        if not s.done:
            calls.append("ran")
            (folder / "out.txt").write_text("x")
            s.result = {"value": params["n"] * 2}
    return s.result


def test_second_run_with_same_params_skips(tmp_path: Path) -> None:
    calls: list[str] = []
    assert _run(tmp_path / "s", {"n": 2}, calls) == {"value": 4}
    assert _run(tmp_path / "s", {"n": 2}, calls) == {"value": 4}
    assert calls == ["ran"]
    assert read_step(tmp_path / "s")["params"] == {"n": 2}


def test_changed_params_or_missing_output_run_again(tmp_path: Path) -> None:
    calls: list[str] = []
    _run(tmp_path / "s", {"n": 2}, calls)
    assert _run(tmp_path / "s", {"n": 3}, calls) == {"value": 6}
    (tmp_path / "s" / "out.txt").unlink()
    _run(tmp_path / "s", {"n": 3}, calls)
    assert calls == ["ran", "ran", "ran"]


def test_an_interrupted_step_is_not_recorded(tmp_path: Path) -> None:
    plan = Plan(["make"], log=lambda _: None)
    with pytest.raises(RuntimeError), plan.step(tmp_path / "s", "make", {"n": 1}) as s:
        assert not s.done
        raise RuntimeError("killed")
    assert read_step(tmp_path / "s") is None


def test_a_step_that_forgets_its_output_fails(tmp_path: Path) -> None:
    plan = Plan(["make"], log=lambda _: None)
    with (
        pytest.raises(RuntimeError, match="did not write"),
        plan.step(tmp_path / "s", "make", {}, outputs=["missing.bin"]),
    ):
        pass

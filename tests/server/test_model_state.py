"""Version states and the errors they give (server/model_state.py)."""

from __future__ import annotations

from pathlib import Path

from headrace.server.model_state import MAX_REASON, ModelState, ModelStates, safe_reason
from headrace.server.types import Task


def test_reasons_name_the_version_folder_and_no_path(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "m" / "3"
    exc = ValueError(f"Load model from {folder}/model.onnx failed; see /etc/passwd, '/x/y.bin'")
    reason = safe_reason(exc, folder, "m/3")
    assert reason == "ValueError: Load model from m/3/model.onnx failed; see passwd, 'y.bin'"
    assert str(tmp_path) not in reason
    assert safe_reason(OSError(), folder, "m/3") == "OSError"
    long = safe_reason(RuntimeError("x" * 1000), folder, "m/3")
    assert len(long) == MAX_REASON and long.endswith("...")
    assert "\n" not in safe_reason(RuntimeError("two\nlines"), folder, "m/3")


def test_errors_name_the_state_and_unknown_stays_not_found() -> None:
    states = ModelStates()
    states.set("m", "1", ModelState.FAILED, reason="bad file", task=Task.CLASSIFY)
    states.set("m", "2", ModelState.LOADING)
    err = states.not_ready("m")
    assert err is not None
    assert str(err) == (
        "model 'm' has no ready version (version 2 is loading; version 1 failed to load: bad file)"
    )
    assert str(states.not_ready("m", "1")) == "model 'm' version 1 failed to load: bad file"
    assert states.not_ready("m", "9") is None and states.not_ready("other") is None
    by_task = states.not_ready_for_task(Task.CLASSIFY)
    assert by_task is not None and "m version 1 failed" in str(by_task)
    assert states.not_ready_for_task(Task.GENERATE) is None
    # a ready version: nothing to report; a retiring one is gone for good (NOT_FOUND)
    states.set("m", "2", ModelState.READY)
    assert states.not_ready("m") is None and states.ready("m")
    states.set("r", "1", ModelState.RETIRING)
    assert states.not_ready("r") is None and states.not_ready("r", "1") is None


def test_changes_are_counted_and_forgotten_versions_go() -> None:
    states = ModelStates()
    states.set("m", "1", ModelState.LOADING, task=Task.GENERATE)
    before = states.changes
    states.set("m", "1", ModelState.LOADING)  # the same: no change, task kept
    assert states.changes == before and states.of("m")[0].task is Task.GENERATE
    states.set("m", "1", ModelState.READY)
    assert states.changes == before + 1
    states.forget("m", "1")
    assert states.names() == [] and states.of("m") == []
    states.forget("m", "1")  # twice: nothing
    assert states.changes == before + 2

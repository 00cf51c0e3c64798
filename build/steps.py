"""Resumable pipeline steps: a step whose outputs exist and match its inputs is skipped.

Each step owns a folder and writes `step.json` there when (and only when) it
finishes: its parameters' fingerprint, its result, how long it took. A later
run with the same parameters finds it and reuses the result; changed
parameters, a missing output file or an interrupted step (no `step.json`)
make it run again.

    plan = Plan(["split", "teacher", "student"], log=print)
    with plan.step(work / "teacher", "teacher", params, outputs=["hf/model.safetensors"]) as s:
        if not s.done:
            s.result = train_teacher(...)
    s.result  # either way
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STEP_FILE = "step.json"


def fingerprint(params: Any) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log(message: str) -> None:
    """Progress lines that do not break tqdm's bars."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def fmt_seconds(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class StepRun:
    folder: Path
    name: str
    params: dict[str, Any]
    done: bool = False  # True when a previous run's result was reused
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Plan:
    """A named sequence of steps; prints `[i/N] name` with elapsed time and a rough ETA."""

    names: Sequence[str]
    estimates: dict[str, float] = field(default_factory=dict)  # step -> expected seconds
    log: Callable[[str], None] = log
    started: float = field(default_factory=time.perf_counter)
    finished: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def _eta(self, current: str) -> str:
        left = [n for n in self.names if n not in self.finished and n != current]
        seconds = sum(self.estimates.get(n, 0.0) for n in left)
        return f", ~{fmt_seconds(seconds)} after this step" if seconds else ""

    def note(self, name: str, message: str) -> None:
        """Log a step that always runs (e.g. publishing), without a record."""
        index = list(self.names).index(name) + 1 if name in self.names else len(self.finished) + 1
        self.log(f"[{index}/{len(self.names)}] {name}: {message}")
        self.finished.append(name)

    @contextmanager
    def step(
        self,
        folder: Path,
        name: str,
        params: dict[str, Any],
        *,
        outputs: Sequence[str] = (),
    ) -> Iterator[StepRun]:
        folder = Path(folder)
        run = StepRun(folder=folder, name=name, params=params)
        index = list(self.names).index(name) + 1 if name in self.names else len(self.finished) + 1
        prefix = f"[{index}/{len(self.names)}] {name}"
        previous = read_step(folder)
        if (
            previous is not None
            and previous.get("fingerprint") == fingerprint(params)
            and all((folder / o).exists() for o in outputs)
        ):
            run.done = True
            run.result = dict(previous.get("result") or {})
            run.seconds = float(previous.get("seconds") or 0.0)
            self.log(f"{prefix}: up to date, skipped ({folder})")
            yield run
            self.skipped.append(name)
            self.finished.append(name)
            return
        (folder / STEP_FILE).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        elapsed = fmt_seconds(time.perf_counter() - self.started)
        self.log(f"{prefix}: running (elapsed {elapsed}{self._eta(name)})")
        start, cpu_start = time.perf_counter(), time.process_time()
        yield run
        run.seconds = round(time.perf_counter() - start, 2)
        cpu = round(time.process_time() - cpu_start, 2)  # all threads: a contention-free measure
        missing = [o for o in outputs if not (folder / o).exists()]
        if missing:
            raise RuntimeError(f"step {name} did not write {missing}")
        record = {
            "name": name,
            "fingerprint": fingerprint(params),
            "params": params,
            "result": run.result,
            "seconds": run.seconds,
            "cpu_seconds": cpu,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (folder / STEP_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        self.log(f"{prefix}: done in {fmt_seconds(run.seconds)} (cpu {fmt_seconds(cpu)})")
        self.ran.append(name)
        self.finished.append(name)


def read_step(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / STEP_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None

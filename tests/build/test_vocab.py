"""Vocabulary pruning (build/vocab.py) on the tiny classifier: ids map consistently, the pruned
model's logits equal the unpruned model's on texts in the kept vocabulary, no new [UNK]."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from headrace.build import vocab
from headrace.build.tiny import CORPUS
from headrace.build.training import classifier_logits, encode_texts, load_tokenizer

TRAIN = CORPUS[:6]  # what the pruned vocabulary is built from
HELD_OUT = [
    "the slot answered the deadline",  # words of TRAIN, in other orders
    "I love the weather, nothing awful",  # pieces of other texts: split finer
    "café 東京 naïve",
    "qqq zzz xyzzy",  # letters only, most of them never in TRAIN
]


def _logits(model: object, tokenizer: Path, texts: list[str]) -> np.ndarray:
    return classifier_logits(model, encode_texts(load_tokenizer(tokenizer), texts))


@pytest.fixture()
def pruned(tiny_models: Path, tmp_path: Path) -> tuple[object, object, Path, Path, dict]:
    from transformers import AutoModelForSequenceClassification

    src = tiny_models / "tiny-classifier" / "1" / "hf"
    full = AutoModelForSequenceClassification.from_pretrained(src).eval()
    model = copy.deepcopy(full)
    out = tmp_path / "pruned" / "tokenizer.json"
    stats = vocab.prune_vocab(model, src / "tokenizer.json", TRAIN, out)
    return full, model, src / "tokenizer.json", out, stats


def test_pruned_model_keeps_the_logits_on_texts_in_the_kept_vocabulary(pruned: tuple) -> None:
    full, model, full_tok, pruned_tok, stats = pruned
    assert stats["tokens_after"] < stats["tokens_before"] == full.config.vocab_size
    assert model.get_input_embeddings().num_embeddings == stats["tokens_after"]
    assert model.config.vocab_size == stats["tokens_after"] and model.config.pad_token_id == 0
    texts = [*TRAIN, HELD_OUT[0]]
    # the same pieces, renumbered: every id maps to the piece it had
    a = load_tokenizer(full_tok).encode_batch(texts)
    b = load_tokenizer(pruned_tok).encode_batch(texts)
    assert [e.tokens for e in a] == [e.tokens for e in b]
    assert [e.ids for e in a] != [e.ids for e in b]
    old = json.loads(full_tok.read_text())["model"]["vocab"]
    new = json.loads(pruned_tok.read_text())["model"]["vocab"]
    assert sorted(new.values()) == list(range(len(new))) and set(new) <= set(old)
    for piece in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        assert piece in new
    assert new["[PAD]"] == 0 and b[0].ids[0] == new["[CLS]"] and b[0].ids[-1] == new["[SEP]"]
    np.testing.assert_allclose(
        _logits(model, pruned_tok, texts), _logits(full, full_tok, texts), atol=1e-6
    )


def test_no_new_unk_on_held_out_texts(pruned: tuple) -> None:
    _, _, full_tok, pruned_tok, _ = pruned
    stats = vocab.tokenization_stats(full_tok, pruned_tok, HELD_OUT)
    assert stats["unk_pruned"] == stats["unk_full"]
    assert stats["texts_split_differently"] >= 1  # some held-out words lost their long pieces
    same = vocab.tokenization_stats(full_tok, pruned_tok, TRAIN)
    assert same["texts_split_differently"] == 0 and same["unk_pruned"] == same["unk_full"]


def test_full_vocab_copy_restores_the_unpruned_model(pruned: tuple, tmp_path: Path) -> None:
    full, model, full_tok, pruned_tok, _ = pruned
    hf = pruned_tok.parent
    model.save_pretrained(hf)
    teacher = tmp_path / "teacher"
    full.save_pretrained(teacher)
    shutil.copy2(full_tok, teacher / "tokenizer.json")
    vocab.full_vocab_copy(hf, teacher, tmp_path / "copy")
    from transformers import AutoModelForSequenceClassification

    restored = AutoModelForSequenceClassification.from_pretrained(tmp_path / "copy").eval()
    texts = [*TRAIN, *HELD_OUT]
    np.testing.assert_allclose(
        _logits(restored, tmp_path / "copy" / "tokenizer.json", texts),
        _logits(full, full_tok, texts),
        atol=1e-6,
    )


def test_only_wordpiece_tokenizers(tiny_models: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    src = tiny_models / "tiny-classifier" / "1" / "hf"
    model = AutoModelForSequenceClassification.from_pretrained(src)
    bpe = tiny_models / "tiny-generator" / "1" / "tokenizer.json"
    with pytest.raises(ValueError, match="WordPiece"):
        vocab.prune_vocab(model, bpe, TRAIN, tmp_path / "t.json")


def test_vocab_command_measures_a_corpus(
    tiny_models: Path, labelled_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from headrace.build.cli import main

    base = tiny_models / "tiny-classifier" / "1" / "hf"
    args = ["vocab", "--data", str(labelled_csv), "--base", str(base)]
    assert main([*args, "--text-column", "review", "--label-column", "stars"]) == 0
    report = json.loads(capsys.readouterr().out)  # JSON only: the calibrator's lines go to stderr
    assert report["tokens_after"] < report["tokens_before"]
    assert report["train_max_abs_logit_diff"] == 0.0
    assert report["held_out"]["unk_pruned"] <= report["held_out"]["unk_full"]
    assert report["megabytes_pruned"]["model.onnx"] <= report["megabytes_full"]["model.onnx"]

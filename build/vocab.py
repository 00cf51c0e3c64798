"""Vocabulary pruning: keep only the word pieces a training corpus uses, rebuild the
tokenizer.json with dense new ids, and slice the word-embedding matrix physically.

Kept, in their old order (so [PAD] stays 0): the special tokens, every piece the full
tokenizer produces on the training texts, and every single-character piece (`c` and
`##c`), so that a held-out word whose longer pieces are gone splits into characters
instead of becoming [UNK].

On the training texts the pruned tokenizer yields the very same pieces: WordPiece takes
the longest piece in its vocabulary at each position, and a subset that holds the chosen
piece holds no longer one the full vocabulary lacked. The pruned model therefore gives the
unpruned model's logits there, and its training is unchanged. A held-out word may split
differently (finer pieces); the build measures how often, and the [UNK] count, on the
held-out texts.

    stats = prune_vocab(model, teacher_hf / "tokenizer.json", train_texts, hf / "tokenizer.json")

Build-time only; WordPiece tokenizers and encoder models without an LM head.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _wordpiece(tok_json: dict[str, Any]) -> dict[str, int]:
    model = tok_json.get("model") or {}
    if model.get("type") != "WordPiece":
        raise ValueError(f"vocabulary pruning needs a WordPiece tokenizer, not {model.get('type')}")
    vocab: dict[str, int] = model["vocab"]
    return vocab


def kept_ids(tokenizer_json: Path, texts: Sequence[str]) -> list[int]:
    """Old ids to keep, ascending: specials, the pieces of `texts`, single characters."""
    from tokenizers import Tokenizer

    tok_json = json.loads(Path(tokenizer_json).read_text())
    vocab = _wordpiece(tok_json)
    prefix = tok_json["model"].get("continuing_subword_prefix", "##")
    tok = Tokenizer.from_str(json.dumps(tok_json))
    tok.no_padding()
    tok.no_truncation()
    keep = {a["id"] for a in tok_json.get("added_tokens", [])}
    for enc in tok.encode_batch(list(texts)):
        keep.update(enc.ids)
    keep.update(i for piece, i in vocab.items() if len(piece.removeprefix(prefix)) == 1)
    return sorted(keep)


def prune_tokenizer(tok_json: dict[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """A copy of a tokenizer.json holding only the `kept` old ids, renumbered 0..len-1."""
    vocab = _wordpiece(tok_json)
    by_id = {i: piece for piece, i in vocab.items()}
    remap = {old: new for new, old in enumerate(kept)}
    out: dict[str, Any] = json.loads(json.dumps(tok_json))
    out["model"]["vocab"] = {by_id[old]: new for old, new in remap.items()}
    for added in out.get("added_tokens", []):
        added["id"] = remap[added["id"]]
    if out.get("padding"):
        out["padding"]["pad_id"] = remap[out["padding"]["pad_id"]]
    post = out.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        for special in post["special_tokens"].values():
            special["ids"] = [remap[i] for i in special["ids"]]
    elif post.get("type") in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            post[key] = [post[key][0], remap[post[key][1]]]
    elif post:
        raise ValueError(f"vocabulary pruning: unsupported post-processor {post.get('type')}")
    return out


def prune_vocab(
    model: Any, tokenizer_json: Path, texts: Sequence[str], out_tokenizer: Path
) -> dict[str, Any]:
    """Keep the vocabulary `texts` need (module docstring): slices `model`'s word
    embeddings in place and writes the renumbered tokenizer to `out_tokenizer`."""
    import torch

    if model.get_output_embeddings() is not None:
        raise ValueError("vocabulary pruning: a model with an LM head is not supported")
    tok_json = json.loads(Path(tokenizer_json).read_text())
    kept = kept_ids(tokenizer_json, texts)
    pruned = prune_tokenizer(tok_json, kept)
    old = model.get_input_embeddings()
    if old.num_embeddings != len(_wordpiece(tok_json)):
        raise ValueError(
            f"vocabulary pruning: the model has {old.num_embeddings} embeddings, the "
            f"tokenizer {len(_wordpiece(tok_json))} pieces"
        )
    remap = {o: n for n, o in enumerate(kept)}
    pad = model.config.pad_token_id
    new_pad = remap.get(pad) if pad is not None else None
    new = torch.nn.Embedding(len(kept), old.embedding_dim, padding_idx=new_pad)
    with torch.no_grad():
        new.weight.copy_(old.weight[torch.tensor(kept)])
    model.set_input_embeddings(new)
    model.config.vocab_size = len(kept)
    model.config.pad_token_id = new_pad
    Path(out_tokenizer).parent.mkdir(parents=True, exist_ok=True)
    Path(out_tokenizer).write_text(json.dumps(pruned, ensure_ascii=False))
    prefix = tok_json["model"].get("continuing_subword_prefix", "##")
    singles = sum(1 for p in pruned["model"]["vocab"] if len(p.removeprefix(prefix)) == 1)
    return {
        "tokens_before": old.num_embeddings,
        "tokens_after": len(kept),
        "single_character_pieces": singles,
        "texts": len(texts),
        "embedding_parameters_removed": (old.num_embeddings - len(kept)) * old.embedding_dim,
    }


def restore_vocab(
    model: Any, pruned_tokenizer: Path, full_tokenizer: Path, full_embeddings: Any
) -> None:
    """The inverse, for comparison: `model`'s pruned rows scattered back into a copy of
    `full_embeddings` [V, H] (the rows it was pruned from), so `model` reads
    `full_tokenizer`'s ids again."""
    import torch

    pruned = _wordpiece(json.loads(Path(pruned_tokenizer).read_text()))
    full = _wordpiece(json.loads(Path(full_tokenizer).read_text()))
    old = model.get_input_embeddings()
    weight = full_embeddings.detach().clone()
    new_ids = torch.tensor(list(pruned.values()))
    old_ids = torch.tensor([full[p] for p in pruned])
    with torch.no_grad():
        weight[old_ids] = old.weight[new_ids]
    by_new = {n: p for p, n in pruned.items()}
    pad = model.config.pad_token_id
    full_pad = full[by_new[pad]] if pad is not None else None
    new = torch.nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=full_pad)
    with torch.no_grad():
        new.weight.copy_(weight)
    model.set_input_embeddings(new)
    model.config.vocab_size = int(weight.shape[0])
    model.config.pad_token_id = full_pad


def tokenization_stats(
    full_tokenizer: Path, pruned_tokenizer: Path, texts: Sequence[str]
) -> dict[str, int]:
    """On `texts`: [UNK] pieces under each tokenizer, and texts whose pieces differ."""
    from headrace.build.training import load_tokenizer

    unk = json.loads(Path(full_tokenizer).read_text())["model"]["unk_token"]
    full, pruned = load_tokenizer(full_tokenizer), load_tokenizer(pruned_tokenizer)
    a = full.encode_batch(list(texts))
    b = pruned.encode_batch(list(texts))
    return {
        "texts": len(texts),
        "unk_full": sum(t == unk for e in a for t in e.tokens),
        "unk_pruned": sum(t == unk for e in b for t in e.tokens),
        "texts_split_differently": sum(x.tokens != y.tokens for x, y in zip(a, b, strict=True)),
    }


FULL_VOCAB = "-full-vocab"  # model key suffix of a vocabulary-pruned model's full-vocabulary copy


def full_vocab_copy(pruned_hf: Path, full_hf: Path, out_hf: Path) -> dict[str, Any]:
    """`pruned_hf`'s model with the vocabulary of `full_hf` (the checkpoint it was pruned
    from) restored: the pruned rows put back among `full_hf`'s rows, `full_hf`'s tokenizer.
    The card measures it beside the pruned model: the same weights, the vocabulary apart."""
    from headrace.build.prune import load_classifier
    from headrace.build.training import save_serving_tokenizer

    model = load_classifier(pruned_hf)
    source = load_classifier(full_hf)
    restore_vocab(
        model,
        pruned_hf / "tokenizer.json",
        full_hf / "tokenizer.json",
        source.get_input_embeddings().weight,
    )
    del source
    model.save_pretrained(out_hf)
    save_serving_tokenizer(full_hf / "tokenizer.json", out_hf / "tokenizer.json")
    return {
        "source": pruned_hf.parent.name,
        "vocabulary": int(model.config.vocab_size),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def measure(
    base: Path, split: Any, *, layers: int = 1, calibration_texts: int = 256
) -> dict[str, Any]:
    """What pruning to `split`'s training texts does to a `layers`-deep student of `base`
    (untrained head: sizes and tokenization do not depend on training): pieces kept, [UNK]
    and re-split texts on the held-out texts, the largest logit change on training texts
    (0: the same pieces), and each ONNX form's size with the full and the pruned vocabulary.
    `headrace build vocab` prints it."""
    import contextlib
    import copy
    import sys
    import tempfile

    import numpy as np
    import torch
    from headrace.build.distill import pick_layers, student_from_teacher
    from headrace.build.training import (
        classifier_logits,
        encode_texts,
        load_tokenizer,
        save_serving_tokenizer,
    )
    from transformers import AutoModelForSequenceClassification

    train = [e.text for e in split.train]
    held_out = [e.text for e in split.val + split.test]
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(split.labels))
    full = student_from_teacher(teacher, pick_layers(int(teacher.config.num_hidden_layers), layers))
    del teacher
    sizes: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"full": Path(tmp) / "full", "pruned": Path(tmp) / "pruned"}
        full.save_pretrained(dirs["full"])
        save_serving_tokenizer(base / "tokenizer.json", dirs["full"] / "tokenizer.json")
        pruned = copy.deepcopy(full)
        stats = prune_vocab(
            pruned, dirs["full"] / "tokenizer.json", train, dirs["pruned"] / "tokenizer.json"
        )
        pruned.save_pretrained(dirs["pruned"])
        held = tokenization_stats(
            dirs["full"] / "tokenizer.json", dirs["pruned"] / "tokenizer.json", held_out
        )
        sample = train[:500]
        logits = [
            classifier_logits(
                m, encode_texts(load_tokenizer(d / "tokenizer.json", max_len=128), sample)
            )
            for m, d in ((full, dirs["full"]), (pruned, dirs["pruned"]))
        ]
        for name, d in dirs.items():
            with contextlib.redirect_stdout(sys.stderr):  # the calibrator prints its progress
                _export_forms(d, held_out[:16], train[-calibration_texts:])
            sizes[name] = {
                f: round((d / f).stat().st_size / 1e6, 2)
                for f in ("model.onnx", "model.int8.onnx", "model.qdq.onnx")
            }
    return {
        **stats,
        "held_out": held,
        "train_max_abs_logit_diff": float(np.abs(logits[0] - logits[1]).max()),
        "layers": layers,
        "megabytes_full": sizes["full"],
        "megabytes_pruned": sizes["pruned"],
    }


def _export_forms(d: Path, check: list[str], calibration: list[str]) -> None:
    from headrace.build.export import export_encoder
    from headrace.build.quantize import quantize_int8, quantize_static_qdq

    export_encoder(d, d / "model.onnx", check_texts=check)
    quantize_int8(d / "model.onnx", d / "model.int8.onnx")
    export_encoder(d, d / "plain.onnx", optimize=False, check_texts=None)
    quantize_static_qdq(d / "plain.onnx", d / "model.qdq.onnx", d / "tokenizer.json", calibration)
    (d / "plain.onnx").unlink()

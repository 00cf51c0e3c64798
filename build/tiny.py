"""Tiny randomly initialised models with real tokenizers, in model-repository form.

Used by the tests (built once per session, a few hundred KB each) and by
`headrace build tiny` for a quick local server. Seeded: the same call writes
the same weights.

    make_tiny_classifier(repo / "tiny-classifier" / "1")
    make_tiny_generator(repo / "tiny-generator" / "1")
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from headrace.server.manifest import Artifact, Batching, Generation, Limits, Manifest
from headrace.server.types import Task

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CORPUS = [
    "the service answered every request before the deadline",
    "streams of tokens leave the server as they are generated",
    "a cancelled call frees its slot at the next step",
    "edge boxes run the distilled model without a GPU",
    "I love this, it is great and wonderful",
    "this is terrible, I hate it and it is awful",
    "the weather is fine today, nothing special",
    "café naïve façade — über straße 東京 😀 emoji and accents",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ? ; : ' \" ( )",
] * 4

LABELS = ("negative", "neutral", "positive")


def _wordpiece_tokenizer(vocab_size: int = 400) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return tok


def _bytelevel_tokenizer(vocab_size: int = 400) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _fresh(version_dir: Path) -> Path:
    version_dir = Path(version_dir)
    if version_dir.exists():
        shutil.rmtree(version_dir)
    (version_dir / "hf").mkdir(parents=True)
    return version_dir


def make_tiny_classifier(version_dir: Path, *, seed: int = 0, max_input_tokens: int = 64) -> Manifest:
    """A 2-layer BERT sequence classifier (3 labels) with a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    version_dir = _fresh(version_dir)
    tok = _wordpiece_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(  # type: ignore[call-arg]  # transformers types omit **kwargs
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    model = BertForSequenceClassification(config).eval()  # type: ignore[no-untyped-call]
    model.save_pretrained(version_dir / "hf")
    tok.save(str(version_dir / "hf" / "tokenizer.json"))
    tok.save(str(version_dir / "tokenizer.json"))
    manifest = Manifest(
        task=Task.CLASSIFY,
        tokenizer="tokenizer.json",
        labels=LABELS,
        artifacts=(Artifact(backend="torch", path="hf", precision="fp32"),),
        limits=Limits(max_input_tokens=max_input_tokens, max_texts=32),
        batching=Batching(max_batch=16, max_queue=256),
        provenance={"source": "headrace.build.tiny", "seed": seed, "random_init": True},
    )
    manifest.write(version_dir)
    return manifest


def make_tiny_generator(version_dir: Path, *, seed: int = 0, max_context: int = 128) -> Manifest:
    """A 2-layer GPT-2 causal LM with a byte-level BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    version_dir = _fresh(version_dir)
    tok = _bytelevel_tokenizer()
    eos = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=max_context,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config).eval()  # type: ignore[no-untyped-call]
    model.save_pretrained(version_dir / "hf")
    tok.save(str(version_dir / "hf" / "tokenizer.json"))
    tok.save(str(version_dir / "tokenizer.json"))
    manifest = Manifest(
        task=Task.GENERATE,
        tokenizer="tokenizer.json",
        artifacts=(Artifact(backend="torch", path="hf", precision="fp32"),),
        limits=Limits(max_input_tokens=max_context // 2, max_new_tokens=max_context // 2,
                      default_new_tokens=16),
        batching=Batching(max_batch=8, max_queue=64),
        generation=Generation(eos_token_id=eos, bos_token_id=eos, max_context=max_context),
        provenance={"source": "headrace.build.tiny", "seed": seed, "random_init": True},
    )
    manifest.write(version_dir)
    return manifest

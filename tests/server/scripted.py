"""Test doubles for the decoder engine that compute for real: a tiny byte-level BPE and
`ScriptedDecoder`, a DecoderBackend whose logits are a pure function of a slot's tokens.

A prompt with a script emits the script's tokens (then EOS); any other prompt gets
pseudo-random logits seeded by its history, so a sequence's distribution never depends
on what shares its batch.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from headrace.server.backends.sampling_numpy import sample_numpy
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.trainers import BpeTrainer


def byte_level_bpe(corpus: Sequence[str]) -> Tokenizer:
    """Byte-level BPE trained on `corpus`: characters it never saw span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return tok


class ScriptedDecoder:
    name = "scripted"
    precision = "fp32"
    device = "cpu"

    def __init__(self, vocab_size: int, eos: int, *, max_slots: int = 4, max_context: int = 64):
        self.vocab_size = vocab_size
        self.eos = eos
        self.max_slots = max_slots
        self.max_context = max_context
        self.scripts: dict[tuple[int, ...], list[int]] = {}
        self.slots: dict[int, tuple[tuple[int, ...], list[int]]] = {}  # slot -> (prompt, fed)
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.fail_decodes = 0  # the next N decode calls raise
        self.fail_prompt: tuple[int, ...] | None = None  # prefill of this prompt raises
        self.gate = threading.Event()  # decode waits on it
        self.gate.set()
        self.short_samples = 0  # the next N batched samples return one token too few
        self.delay_s = 0.0  # each decode takes at least this long

    def _logits(self, slot: int) -> np.ndarray:
        prompt, fed = self.slots[slot]
        if prompt in self.scripts:
            script = self.scripts[prompt]
            nxt = script[len(fed)] if len(fed) < len(script) else self.eos
            row = np.full(self.vocab_size, -10.0, dtype=np.float32)
            row[nxt] = 10.0
            return row
        seed = zlib.crc32(np.asarray(prompt + tuple(fed), dtype=np.int64).tobytes())
        row = np.random.default_rng(seed).normal(0, 3, self.vocab_size).astype(np.float32)
        row[self.eos] = -30.0  # unscripted sequences run to their length limit
        return row

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        assert slot not in self.slots, f"slot {slot} prefilled while in use"
        assert 0 <= slot < self.max_slots
        self.calls.append(("prefill", (slot,)))
        if tuple(token_ids) == self.fail_prompt:
            raise RuntimeError("prefill exploded at /secret/path")
        self.slots[slot] = (tuple(token_ids), [])
        return self._logits(slot)

    def decode(self, slots: Sequence[int], last_tokens: Sequence[int]) -> np.ndarray:
        self.gate.wait(10)
        time.sleep(self.delay_s)
        self.calls.append(("decode", tuple(slots)))
        if self.fail_decodes:
            self.fail_decodes -= 1
            raise RuntimeError("decode exploded at /secret/path")
        for slot, token in zip(slots, last_tokens, strict=True):
            self.slots[slot][1].append(token)
            assert len(self.slots[slot][0]) + len(self.slots[slot][1]) <= self.max_context
        return np.stack([self._logits(s) for s in slots])

    def sample(self, logits: Any, params: Any, generators: Any, histories: Any) -> list[int]:
        picks = sample_numpy(logits, params, generators, histories)
        if self.short_samples and len(picks) > 1:
            self.short_samples -= 1
            return picks[:-1]
        return picks

    def release(self, slot: int) -> None:
        self.calls.append(("release", (slot,)))
        self.slots.pop(slot, None)

    def close(self) -> None:
        pass

    def decode_sizes(self) -> list[int]:
        return [len(s) for kind, s in self.calls if kind == "decode"]

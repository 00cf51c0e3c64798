"""What a backend is: arrays in, arrays out. No gRPC, no asyncio.

Backends are chosen by name from the model manifest through `registry.py`;
each imports its runtime (torch, onnxruntime, tensorrt) lazily, inside its
own module, so `headrace.server` imports without any of them.

Threading: the engine calls a backend from one worker thread at a time per
model (the batcher's or scheduler's executor). Backends need not be
thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from headrace.server.types import SamplingParams


@runtime_checkable
class EncoderBackend(Protocol):
    """A sequence classifier."""

    name: str  # "torch", "onnxruntime", "tensorrt"
    precision: str  # "fp32", "fp16", "int8"
    device: str  # "cpu", "cuda:0"

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids, attention_mask: int64 [B, S] -> logits float32 [B, num_labels] (numpy)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class DecoderBackend(Protocol):
    """A causal LM that owns a KV cache of `max_slots` sequences.

    Logits stay where they were computed: `prefill` and `decode` return the
    backend's own array type, and `sample` picks the next tokens there, so a
    GPU step never copies a vocabulary-wide tensor to the host.
    """

    name: str
    precision: str
    device: str
    max_slots: int  # sequences the KV cache holds at once
    max_context: int  # prompt + generated tokens one slot holds
    vocab_size: int

    def prefill(self, slot: int, token_ids: Sequence[int]) -> Any:
        """Run the prompt into `slot`'s cache -> logits of its last position, [vocab]."""
        ...

    def decode(self, slots: Sequence[int], last_tokens: Sequence[int]) -> Any:
        """One step for every slot in `slots` at once -> logits [len(slots), vocab]."""
        ...

    def sample(
        self,
        logits: Any,
        params: Sequence[SamplingParams],
        generators: Sequence[np.random.Generator | None],
        histories: Sequence[Sequence[int]],
    ) -> list[int]:
        """Pick one token per row of `logits` ([N, vocab] or [vocab] for N == 1).

        `generators[i]` is sequence i's own RNG (None when greedy), so a seeded
        sequence samples the same tokens whatever shares its batch;
        `histories[i]` is its prompt + output, for the repetition penalty.
        """
        ...

    def release(self, slot: int) -> None:
        """Free `slot`; its cache may be overwritten by the next prefill."""
        ...

    def close(self) -> None: ...


def ensure_2d(logits: np.ndarray) -> np.ndarray:
    return logits[None, :] if logits.ndim == 1 else logits

"""A served model: manifest + tokenizer + backend + its batching engine.

The service calls these and nothing below them:

    model = ClassifierModel(name, version, manifest, backend, tokenizer)
    await model.start()
    items = await model.classify(["great", "awful"], top_k=2)

    model = GeneratorModel(name, version, manifest, backend, tokenizer)
    await model.start()
    params, truncated = model.prepare(prompt, max_new_tokens=0, sampling=SamplingParams(),
                                      stop=(), reject_overlong=False)
    async for event in model.generate(params): ...

Tokenization runs in Rust (`tokenizers`) on the calling thread; model
compute runs in each engine's own worker thread.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import numpy as np
from headrace.server import metrics
from headrace.server.backends.base import DecoderBackend, EncoderBackend
from headrace.server.engine.batcher import EncoderBatcher
from headrace.server.engine.detokenize import check_stop_strings
from headrace.server.engine.scheduler import DecoderScheduler
from headrace.server.manifest import Manifest
from headrace.server.types import (
    BackendFailure,
    ClassifyItem,
    GenerateParams,
    InvalidInput,
    SamplingParams,
    Task,
    TokenEvent,
)
from tokenizers import Tokenizer

PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>")


def load_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer.json file -> a Rust tokenizer, as the file configures it.

    The models take a private copy with padding and truncation off (the engine
    pads and truncates itself), after reading the pad id from it."""
    return Tokenizer.from_file(str(path))


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The padding id: the tokenizer's padding config, else a known pad token, else 0."""
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in PAD_TOKENS:
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return int(tid)
    return 0


def _private_copy(tokenizer: Tokenizer) -> Tokenizer:
    # a copy with padding and truncation off, so the caller's tokenizer stays as it was
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def softmax(logits: np.ndarray) -> np.ndarray:
    """logits [B, L] -> probabilities [B, L] (float64 for the exp, float32 out)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z.astype(np.float32)


class ClassifierModel:
    """A sequence classifier behind an EncoderBatcher."""

    task = Task.CLASSIFY

    def __init__(
        self,
        name: str,
        version: str,
        manifest: Manifest,
        backend: EncoderBackend,
        tokenizer: Tokenizer,
    ) -> None:
        self.name = name
        self.version = version
        self.manifest = manifest
        self.backend = backend
        self.pad_id = pad_id_of(tokenizer)
        self.tokenizer = _private_copy(tokenizer)
        self.max_tokens = manifest.limits.max_input_tokens
        # the same tokenizer truncating to the limit, for the texts that exceed it
        self._truncating = _private_copy(tokenizer)
        self._truncating.enable_truncation(max_length=self.max_tokens)
        batching = manifest.batching
        self.batcher = EncoderBatcher(
            name,
            backend,
            max_batch=batching.max_batch,
            max_delay_ms=batching.max_delay_ms,
            max_queue=batching.max_queue,
            max_padding=batching.max_padding,
            pad_id=self.pad_id,
            max_length=self.max_tokens,
        )

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self, *, drain: bool = True) -> None:
        await self.batcher.stop(drain=drain)

    def encode(
        self, texts: Sequence[str], *, reject_overlong: bool = False
    ) -> list[tuple[list[int], bool]]:
        """texts -> (token ids, truncated) each, special tokens included."""
        encodings = self.tokenizer.encode_batch(list(texts))
        out: list[tuple[list[int], bool]] = []
        for i, enc in enumerate(encodings):
            ids = enc.ids
            if len(ids) <= self.max_tokens:
                out.append((ids, False))
                continue
            if reject_overlong:
                raise InvalidInput(
                    f"texts[{i}]",
                    f"text has {len(ids)} tokens; the model takes at most {self.max_tokens}",
                )
            out.append((self._truncating.encode(texts[i]).ids, True))
        return out

    async def classify(
        self, texts: Sequence[str], *, top_k: int = 0, reject_overlong: bool = False
    ) -> list[ClassifyItem]:
        """Labels best first for each text (top_k 0 = all labels).

        Raises InvalidInput, QueueFull, ShuttingDown, BackendFailure.
        """
        if not texts:
            return []
        encoded = self.encode(texts, reject_overlong=reject_overlong)
        logits = await self.batcher.submit([ids for ids, _ in encoded])  # [N, L]
        labels = self.manifest.labels
        if logits.shape[1] != len(labels):
            raise BackendFailure(
                f"the model returned {logits.shape[1]} scores for {len(labels)} labels"
            )
        probs = softmax(logits)
        order = np.argsort(-probs, axis=-1, kind="stable")
        keep = len(labels) if top_k <= 0 else min(top_k, len(labels))
        items = []
        for row, (ids, truncated) in enumerate(encoded):
            best = order[row, :keep]
            items.append(
                ClassifyItem(
                    labels=tuple((labels[j], float(probs[row, j])) for j in best),
                    truncated=truncated,
                    input_tokens=len(ids),
                )
            )
        metrics.PROMPT_TOKENS.labels(self.name).inc(sum(len(ids) for ids, _ in encoded))
        return items


class GeneratorModel:
    """A causal LM behind a DecoderScheduler."""

    task = Task.GENERATE

    def __init__(
        self,
        name: str,
        version: str,
        manifest: Manifest,
        backend: DecoderBackend,
        tokenizer: Tokenizer,
    ) -> None:
        self.name = name
        self.version = version
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = _private_copy(tokenizer)
        gen = manifest.generation
        self.max_context = min(gen.max_context, backend.max_context)
        self.scheduler = DecoderScheduler(
            name,
            backend,
            self.tokenizer,
            max_batch=manifest.batching.max_batch,
            max_queue=manifest.batching.max_queue,
            eos_token_id=gen.eos_token_id,
            max_context=self.max_context,
        )

    @property
    def active_slots(self) -> int:
        return self.scheduler.active_slots

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    async def start(self) -> None:
        await self.scheduler.start()

    async def stop(self, *, drain: bool = True) -> None:
        await self.scheduler.stop(drain=drain)

    def prepare(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        sampling: SamplingParams,
        stop: Sequence[str],
        reject_overlong: bool,
    ) -> tuple[GenerateParams, bool]:
        """Tokenize and check a request -> (params, whether the prompt was truncated).

        An overlong prompt keeps its last tokens (the end is what the model
        continues) unless reject_overlong, which raises InvalidInput("prompt").
        """
        limits = self.manifest.limits
        if max_new_tokens < 0 or max_new_tokens > limits.max_new_tokens:
            raise InvalidInput(
                "max_new_tokens", f"max_new_tokens must be 0..{limits.max_new_tokens}"
            )
        check_stop_strings(
            stop, max_count=limits.max_stop_strings, max_length=limits.max_stop_length
        )
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            bos = self.manifest.generation.bos_token_id
            if bos is None:
                raise InvalidInput("prompt", "the prompt has no tokens")
            ids = [bos]
        limit = min(limits.max_input_tokens, self.max_context - 1)
        truncated = len(ids) > limit
        if truncated:
            if reject_overlong:
                raise InvalidInput(
                    "prompt", f"prompt has {len(ids)} tokens; the model takes at most {limit}"
                )
            ids = ids[-limit:]
        params = GenerateParams(
            prompt_ids=tuple(ids),
            max_new_tokens=max_new_tokens or limits.default_new_tokens,
            sampling=sampling,
            stop=tuple(stop),
        )
        return params, truncated

    async def generate(self, params: GenerateParams) -> AsyncGenerator[TokenEvent, None]:
        """Token events as they are made; the last has finish_reason and usage.

        Closing the iterator (or cancelling its consumer) frees the sequence's
        KV slot at the next engine step. Raises QueueFull, ShuttingDown,
        BackendFailure (at the first iteration for the first two).
        """
        seq = self.scheduler.submit(params)
        try:
            while True:
                event = await seq.next_event()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.scheduler.cancel(seq)

"""A served model: manifest + tokenizer + backend + its batching engine.

Every front calls these and nothing below them, with the typed calls of
server/types.py; each model checks a call against its own limits first
(server/calls.py), so every front gets the same checks and errors:

    model = ClassifierModel(name, version, manifest, backend, tokenizer)
    await model.start()
    items = await model.classify(ClassifyCall(texts=("great", "awful"), top_k=2))

    model = GeneratorModel(name, version, manifest, backend, tokenizer)
    await model.start()
    params, truncated = model.prepare(GenerateCall(prompt="Once", max_new_tokens=16))
    async for event in model.generate(params): ...

Tokenization runs in Rust (`tokenizers`): a classifier's texts in the batcher's
worker thread, one tokenizer call per batch (the event loop only checks and
queues a call); a prompt on the calling thread. Model compute runs in each
engine's own worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar, TypeAlias

import numpy as np
from headrace.server import metrics, tracing
from headrace.server.backends.base import DecoderBackend, EncoderBackend
from headrace.server.calls import check_classify, check_generate, overlong
from headrace.server.engine.base import Engine
from headrace.server.engine.batcher import EncoderBatcher
from headrace.server.engine.scheduler import DecoderScheduler, Stream
from headrace.server.manifest import Manifest
from headrace.server.types import (
    BackendFailure,
    ClassifyCall,
    ClassifyItem,
    GenerateCall,
    GenerateParams,
    InvalidArgument,
    StreamInterval,
    Task,
    TokenEvent,
)
from tokenizers import Tokenizer

PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>")
Labels: TypeAlias = tuple[tuple[str, float], ...]  # (label, probability), best first


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


SMALL_LABELS = 32  # up to this many labels, a row's softmax in plain Python beats numpy's


def top_labels(logits: np.ndarray, labels: Sequence[str], keep: int) -> list[Labels]:
    """logits [B, L] -> the `keep` best (label, probability) of each row, best first;
    ties keep label order."""
    if len(labels) > SMALL_LABELS:
        probs = softmax(logits)
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :keep]
        return [
            tuple((labels[j], float(p[j])) for j in best)
            for p, best in zip(probs, order, strict=True)
        ]
    out: list[Labels] = []
    for row in logits.tolist():
        top = max(row)
        exps = [math.exp(x - top) for x in row]
        total = math.fsum(exps)
        best = sorted(range(len(exps)), key=exps.__getitem__, reverse=True)[:keep]
        out.append(tuple((labels[j], exps[j] / total) for j in best))
    return out


class ServedModel:
    """What both kinds share: one version's manifest, tokenizer, backend and engine."""

    task: ClassVar[Task]
    backend: EncoderBackend | DecoderBackend

    def __init__(self, name: str, version: str, manifest: Manifest, tokenizer: Tokenizer) -> None:
        self.name = name
        self.version = version
        self.manifest = manifest
        self.tokenizer = _private_copy(tokenizer)

    @property
    def engine(self) -> Engine:
        raise NotImplementedError

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self, *, drain: bool = True) -> None:
        await self.engine.stop(drain=drain)

    def close(self) -> None:
        """Free the backend (after stop)."""
        self.backend.close()


class ClassifierModel(ServedModel):
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
        super().__init__(name, version, manifest, tokenizer)
        self.backend: EncoderBackend = backend
        self.pad_id = pad_id_of(tokenizer)
        self.max_tokens = manifest.limits.max_input_tokens
        # the same tokenizer truncating to the limit: the batcher's (worker thread)
        self._truncating = _private_copy(tokenizer)
        self._truncating.enable_truncation(max_length=self.max_tokens)
        self._prompt_tokens = metrics.PROMPT_TOKENS.labels(name)
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
            tokenize=self.tokenize,
        )

    @property
    def engine(self) -> Engine:
        return self.batcher

    def encode(
        self, texts: Sequence[str], *, reject_overlong: bool = False
    ) -> list[tuple[list[int], bool]]:
        """texts -> (token ids, truncated) each, special tokens included."""
        encodings = self.tokenizer.encode_batch_fast(list(texts))  # ids only, no offsets
        out: list[tuple[list[int], bool]] = []
        for i, enc in enumerate(encodings):
            ids = enc.ids
            if len(ids) <= self.max_tokens:
                out.append((ids, False))
                continue
            if reject_overlong:
                raise overlong(f"texts[{i}]", len(ids), self.max_tokens)
            out.append((self._truncating.encode(texts[i]).ids, True))
        return out

    def tokenize(self, texts: list[str]) -> list[tuple[list[int], bool]]:
        """The batcher's worker thread: texts -> (token ids truncated to the limit, truncated)."""
        # `encode_batch_fast`: the same ids and overflow as encode_batch without the
        # offsets, which nothing here reads (7-14 % less engine CPU per call, measured
        # in-process at 64 callers; docs/bench.md). One text runs on this thread.
        encodings = self._truncating.encode_batch_fast(texts)
        return [(enc.ids, bool(enc.overflowing)) for enc in encodings]

    async def classify(self, call: ClassifyCall) -> list[ClassifyItem]:
        """Labels best first for each text (top_k 0 = all labels).

        Raises InvalidArgument, QueueFull, ShuttingDown, BackendFailure.
        """
        check_classify(call, self.manifest.limits)
        rows: Sequence[str | list[int]] = call.texts  # tokenized with their batch
        if call.reject_overlong:  # tokenized here: an overlong text fails before queueing
            rows = [ids for ids, _ in self.encode(call.texts, reject_overlong=True)]
        out = await self.batcher.submit(rows)
        labels = self.manifest.labels
        if out.logits.shape[1] != len(labels):
            raise BackendFailure(
                f"the model returned {out.logits.shape[1]} scores for {len(labels)} labels"
            )
        keep = len(labels) if call.top_k <= 0 else min(call.top_k, len(labels))
        best = top_labels(out.logits, labels, keep)
        items = [
            ClassifyItem(row, truncated, tokens)
            for row, tokens, truncated in zip(best, out.tokens, out.truncated, strict=True)
        ]
        self._prompt_tokens.inc(sum(out.tokens))
        return items


class GeneratorModel(ServedModel):
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
        super().__init__(name, version, manifest, tokenizer)
        self.backend: DecoderBackend = backend
        self.stream = StreamInterval()  # what a call leaving stream_interval* unset gets
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
    def engine(self) -> Engine:
        return self.scheduler

    @property
    def active_slots(self) -> int:
        return self.scheduler.active_slots

    def prepare(self, call: GenerateCall) -> tuple[GenerateParams, bool]:
        """Check and tokenize a call -> (params, whether the prompt was truncated).

        An overlong prompt keeps its last tokens (the end is what the model
        continues) unless call.reject_overlong, which raises InvalidArgument("prompt").
        """
        limits = self.manifest.limits
        check_generate(call, limits, self.backend.vocab_size)
        ids = self.tokenizer.encode(call.prompt).ids
        if not ids:
            bos = self.manifest.generation.bos_token_id
            if bos is None:
                raise InvalidArgument("prompt", "prompt has no tokens")
            ids = [bos]
        limit = min(limits.max_input_tokens, self.max_context - 1)
        truncated = len(ids) > limit
        if truncated:
            if call.reject_overlong:
                raise overlong("prompt", len(ids), limit)
            ids = ids[-limit:]
        params = GenerateParams(
            prompt_ids=tuple(ids),
            max_new_tokens=call.max_new_tokens or limits.default_new_tokens,
            sampling=call.sampling,
            stop=call.stop,
            stream=StreamInterval(
                call.stream_interval or self.stream.tokens,
                self.stream.ms if call.stream_interval_ms is None else call.stream_interval_ms,
            ),
        )
        return params, truncated

    async def generate(
        self, params: GenerateParams, on_queued: Callable[[], None] | None = None
    ) -> AsyncGenerator[TokenEvent, None]:
        """Token events as they are made; the last has finish_reason and usage.

        Closing the iterator (or cancelling its consumer) frees the sequence's
        KV slot at the next engine step. Raises QueueFull, ShuttingDown,
        BackendFailure (at the first iteration for the first two). `on_queued` is
        called once the request is queued, before its first token.
        """
        with self._sequence(params) as (stream, trace):
            if on_queued is not None:
                on_queued()
            while True:
                event = await stream.next_event()
                if trace is not None:
                    trace.chunk(event)
                yield event
                if event.finish_reason is not None:
                    return

    @contextlib.contextmanager
    def _sequence(
        self, params: GenerateParams
    ) -> Iterator[tuple[Stream, tracing.GenerationTrace | None]]:
        """Queue `params` -> (its stream, its trace or None); at the end, however it ends,
        the slot is freed at the next step and the trace ends with the failure if any."""
        stream = self.scheduler.submit(params)
        trace = tracing.generation(self.name, stream)  # None: tracing off
        failure: BaseException | None = None
        try:
            yield stream, trace
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self.scheduler.cancel(stream)
            if trace is not None:
                trace.end(failure)

    async def forward(self, params: GenerateParams, send: Callable[[TokenEvent], None]) -> None:
        """generate() for a consumer that takes each event in the step's delivery itself.

        `send(event)` runs on the event loop inside the scheduler's delivery, as soon as
        an event is due (the same events, coalescing and stream_interval rules as
        generate's), so no task wakes per token: the engine process forwards thousands
        of streams' tokens this way. `send` must not block; what it raises ends this
        stream with that error. Returns after the last event; raises what generate
        raises; cancelling frees the slot as it does.
        """
        loop = asyncio.get_running_loop()
        with self._sequence(params) as (stream, trace):
            done: asyncio.Future[None] = loop.create_future()
            timer: asyncio.TimerHandle | None = None

            def take() -> None:
                nonlocal timer
                while not done.done():
                    try:
                        got = stream.poll()
                    except BaseException as exc:  # the engine's error for this stream
                        done.set_exception(exc)
                        return
                    if not isinstance(got, TokenEvent):
                        if got is not None and timer is None:  # stream_interval_ms not over
                            timer = loop.call_later(got, on_timer)
                        return
                    try:
                        if trace is not None:
                            trace.chunk(got)
                        send(got)
                    except Exception as exc:  # this stream's, not the delivery's other streams'
                        done.set_exception(exc)
                        return
                    if got.finish_reason is not None:
                        done.set_result(None)

            def on_timer() -> None:
                nonlocal timer
                timer = None
                take()

            stream.on_ready = take
            try:
                await done
            finally:
                stream.on_ready = None
                if timer is not None:
                    timer.cancel()

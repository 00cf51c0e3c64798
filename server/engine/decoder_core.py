"""One decoder step over every running sequence, single-threaded.

`DecoderCore` owns the sequences of one model (slots, RNGs, histories, detokenizers,
stop matchers) and does one step when asked, three verbs:

- schedule: `cancel` frees the slots of sequences whose consumer left; `step` admits
  the requests it is given into free slots;
- execute: prefill each admitted sequence and sample its first token from the prefill
  logits; one `backend.decode` and one `backend.sample` (per-sequence parameters, RNGs
  and histories) for every sequence that ran before the step;
- update: detokenize incrementally, match stop strings, decide who finished and
  release their slots at once.

A step returns one immutable `StepOutput` naming sequences by id. The decoder
scheduler (server/engine/scheduler.py) runs the core in its worker thread and hands
the outputs to the event loop; a test can drive the same core in one thread.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog
from headrace.server.backends.base import DecoderBackend, make_generator
from headrace.server.engine.detokenize import IncrementalDetokenizer, StopMatcher
from headrace.server.types import FinishReason, GenerateParams
from tokenizers import Tokenizer

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TokenOut:
    seq_id: int  # Stream.seq_id of the consumer
    text: str  # new complete text (never a broken character, never part of a stop string)
    token: int
    finish: FinishReason | None


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one step did, handed from the worker to the event loop and never changed."""

    step: int  # the worker's step counter, so a run can be replayed step by step
    at: float  # perf_counter when its tokens were ready: TTFT and ITL are measured to it
    cancelled: tuple[int, ...] = ()  # their slots were freed first thing in the step
    admitted: tuple[int, ...] = ()  # prefilled in this step
    tokens: tuple[TokenOut, ...] = ()  # one per sequence that advanced
    failed: tuple[tuple[int, BaseException], ...] = ()  # their slots are free
    prefill_s: tuple[float, ...] = ()
    decode_s: float | None = None
    decode_rows: int = 0  # sequences in the decode call
    running: int = 0  # sequences holding a slot after the step
    started: float = 0.0  # perf_counter when the step began (a prefill's admission, for traces)


_Failed = list[tuple[int, BaseException]]


@dataclass(eq=False)
class _Sequence:
    """An admitted request's state. Worker thread only."""

    seq_id: int
    params: GenerateParams
    slot: int
    generator: np.random.Generator | None  # its own RNG: same seed, same text in any batch
    history: list[int]  # prompt + output, for the repetition penalty
    detok: IncrementalDetokenizer
    stops: StopMatcher
    generated: int = 0
    last_token: int = -1  # input of the next decode step


class DecoderCore:
    """The sequences and one step over them. Single-threaded: the worker's (or a test's)."""

    def __init__(
        self,
        name: str,
        backend: DecoderBackend,
        tokenizer: Tokenizer,
        *,
        num_slots: int,
        eos_token_id: int | None,
        max_context: int,
    ) -> None:
        self.name = name  # the model's, for the log
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_context = max_context
        self._free = list(range(num_slots - 1, -1, -1))  # pop() -> slot 0 first
        self._running: dict[int, _Sequence] = {}  # in admission order

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def running(self) -> int:
        return len(self._running)

    def cancel(self, seq_ids: Sequence[int]) -> tuple[int, ...]:
        """Free the slots of these sequences -> the ids that held one (others had ended)."""
        held = tuple(i for i in seq_ids if i in self._running)
        for seq_id in held:
            self._leave(self._running[seq_id])
        return held

    def step(
        self,
        index: int,
        joins: Sequence[tuple[int, GenerateParams]],
        cancelled: tuple[int, ...] = (),
    ) -> StepOutput:
        """Admit `joins` (at most free_slots), prefill them, decode the others: one step."""
        started = time.perf_counter()
        decode = list(self._running.values())
        tokens: list[TokenOut] = []
        failed: _Failed = []
        prefill_s: list[float] = []
        decode_s: float | None = None
        try:
            for seq in [self._admit(seq_id, params) for seq_id, params in joins]:
                self._prefill(seq, tokens, failed, prefill_s)
            if decode:
                decode_s = self._decode(decode, tokens, failed)
        except Exception as exc:  # a bug outside the backend calls: fail the step, start clean
            log.error("decoder step failed", model=self.name, exc_info=exc)
            self.release_all()
            seq_ids = [seq.seq_id for seq in decode] + [seq_id for seq_id, _ in joins]
            tokens, failed, decode_s = [], [(seq_id, exc) for seq_id in seq_ids], None
        return StepOutput(
            step=index,
            at=time.perf_counter(),
            cancelled=cancelled,
            admitted=tuple(seq_id for seq_id, _ in joins),
            tokens=tuple(tokens),
            failed=tuple(failed),
            prefill_s=tuple(prefill_s),
            decode_s=decode_s,
            decode_rows=len(decode) if decode_s is not None else 0,
            running=len(self._running),
            started=started,
        )

    def release_all(self) -> None:
        for seq in list(self._running.values()):
            self._leave(seq)

    def _admit(self, seq_id: int, params: GenerateParams) -> _Sequence:
        prompt = list(params.prompt_ids)
        seq = _Sequence(
            seq_id=seq_id,
            params=params,
            slot=self._free.pop(),
            generator=make_generator(params.sampling),
            history=prompt,
            detok=IncrementalDetokenizer(self.tokenizer, prompt),
            stops=StopMatcher(params.stop),
        )
        self._running[seq_id] = seq
        return seq

    def _prefill(
        self, seq: _Sequence, tokens: list[TokenOut], failed: _Failed, seconds: list[float]
    ) -> None:
        """One backend.prefill, and the first token sampled from its logits."""
        try:
            t0 = time.perf_counter()
            logits = self.backend.prefill(seq.slot, seq.params.prompt_ids)  # [V]
            [token] = self.backend.sample(
                logits, [seq.params.sampling], [seq.generator], [seq.history]
            )
            seconds.append(time.perf_counter() - t0)
        except Exception as exc:
            self._leave(seq)
            failed.append((seq.seq_id, exc))
            return
        tokens.append(self._advance(seq, int(token)))

    def _decode(
        self, seqs: list[_Sequence], tokens: list[TokenOut], failed: _Failed
    ) -> float | None:
        """One backend.decode + sample for `seqs` -> its seconds (None when it failed)."""
        try:
            t0 = time.perf_counter()
            logits = self.backend.decode([s.slot for s in seqs], [s.last_token for s in seqs])
            picked = self.backend.sample(  # logits: [N, V]
                logits,
                [s.params.sampling for s in seqs],
                [s.generator for s in seqs],
                [s.history for s in seqs],
            )
            seconds = time.perf_counter() - t0
        except Exception as exc:
            for seq in seqs:
                self._leave(seq)
                failed.append((seq.seq_id, exc))
            return None
        for seq, token in zip(seqs, picked, strict=True):
            tokens.append(self._advance(seq, int(token)))
        return seconds

    def _advance(self, seq: _Sequence, token: int) -> TokenOut:
        """Account one sampled token: its text, whether the sequence ends."""
        seq.generated += 1
        seq.history.append(token)
        seq.last_token = token
        finish: FinishReason | None = None
        if token == self.eos_token_id and not seq.params.sampling.ignore_eos:
            text, finish = "", FinishReason.EOS
        else:
            text, matched = seq.stops.push(seq.detok.add(token))
            if matched:
                finish = FinishReason.STOP
            elif seq.generated >= seq.params.max_new_tokens or len(seq.history) >= self.max_context:
                finish = FinishReason.LENGTH
        if finish in (FinishReason.EOS, FinishReason.LENGTH):
            # the sequence ends: emit what was held back (a partial character, a
            # tail that could have begun a stop string), unless it completes a stop
            rest, matched = seq.stops.push(seq.detok.flush())
            text += rest
            if matched:
                finish = FinishReason.STOP
            else:
                text += seq.stops.flush()
        if finish is not None:
            self._leave(seq)
        return TokenOut(seq.seq_id, text, token, finish)

    def _leave(self, seq: _Sequence) -> None:
        del self._running[seq.seq_id]
        self._free.append(seq.slot)
        try:
            self.backend.release(seq.slot)
        except Exception as exc:  # the slot is reused by the next prefill regardless
            log.warning("release failed", model=self.name, slot=seq.slot, exc_info=exc)

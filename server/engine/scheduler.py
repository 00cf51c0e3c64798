"""Continuous batching for decoders, as TGI and vLLM do it: the threads and the delivery.

Two sides, each the sole owner of its state (vLLM v1's engine core and output processor):

- The worker thread owns every sequence: it runs a `DecoderCore`
  (server/engine/decoder_core.py: schedule -> execute -> update, one step at a time)
  and nothing else touches the core. Each step ends in an immutable `StepOutput`
  (tokens and text per sequence id, finish reasons, a timestamp) that reaches the
  event loop through `call_soon_threadsafe`.
- The event loop owns each consumer's `Stream` (its delivery buffer and timings) and
  the metrics. Requests and cancellations reach the worker through the `_Inbox`, a
  message queue under one lock that the worker reads between steps only. Nothing but
  frozen values (ids, GenerateParams, StepOutput) crosses between the two threads.

The worker steps on without waiting for the loop (a round trip per step through a loop
busy writing the last step's chunks made a 1.8 ms step take 4.6 ms), with one exception:
after a step that made first tokens while few sequences run, it waits (2 ms at most) until
the loop has handed them to their consumers, so that the first message leaves before the
next decode step takes the cores (time to first token, the one figure a lone caller sees). Delivery is a
per-stream buffer: a consumer that falls behind gets every pending token in one
coalesced TokenEvent, so the transport never throttles the step loop (a consumer that
sets `Stream.on_ready` takes its events inside the delivery itself, with no task to wake:
GeneratorModel.forward, for the engine process). The worker
sleeps on the inbox when there is nothing to run. A cancelled stream leaves the queue
at once, or its slot is freed at the worker's next step, before any request is admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from headrace.server import metrics
from headrace.server.backends.base import DecoderBackend
from headrace.server.engine.base import Engine
from headrace.server.engine.decoder_core import DecoderCore, StepOutput
from headrace.server.types import (
    BackendFailure,
    FinishReason,
    GenerateParams,
    QueueFull,
    ShuttingDown,
    TokenEvent,
)
from tokenizers import Tokenizer

log = structlog.get_logger(__name__)

# After a step that made first tokens, while few sequences run, the worker waits (at most
# this long) until the event loop has handed them to their consumers: the next decode step
# would otherwise take the cores the first message needs on its way out.
FIRST_TOKEN_HANDOFF_S = 0.002
FIRST_TOKEN_HANDOFF_ROWS = 4
BACKEND_FAILED = "the model failed while generating this sequence"


@dataclass(eq=False)
class Stream:
    """One request as its consumer sees it. Event-loop thread only."""

    seq_id: int  # the id StepOutputs name it by
    params: GenerateParams  # frozen: the worker gets it through the inbox
    arrival: float  # perf_counter at submit, for time to first token
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pending_text: list[str] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    pending_times: list[int] = field(default_factory=list)  # µs since arrival, per token
    sent_at: float | None = None  # perf_counter of the latest event taken (stream_interval_ms)
    tokens: int = 0  # tokens pushed so far
    first_at: float | None = None  # StepOutput.at of its first token
    admitted_at: float | None = None  # StepOutput.started of the step that prefilled it
    last_at: float = 0.0  # StepOutput.at of its latest token
    finish: FinishReason | None = None
    error: BaseException | None = None
    finished: bool = False  # nothing more will be pushed (finished, failed or cancelled)
    # set by a consumer that takes its events in the delivery itself (GeneratorModel.forward):
    # called instead of waking a task, once per step that touched the stream
    on_ready: Callable[[], None] | None = None

    def push(self, text: str, token_id: int, finish: FinishReason | None, at: float) -> None:
        if self.finished:
            return
        self.tokens += 1
        if text:
            self.pending_text.append(text)
        self.pending_ids.append(token_id)
        self.pending_times.append(int((at - self.arrival) * 1e6))
        if finish is not None:
            self.finish = finish
            self.finished = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self.finished:
            return
        self.error = error
        self.finished = True
        self._wake()

    def _wake(self) -> None:
        if self.on_ready is not None:
            self.on_ready()
        else:
            self.ready.set()

    def _wait_s(self) -> float | None:
        """0 when an event is due now, None when tokens must come first, else seconds to wait.

        Due: the last event (finish), or params.stream's rules (enough tokens, enough time
        since the previous event). A consumer that is behind finds every token made while
        it was away pending, and takes them in one event.
        """
        if self.finish is not None:
            return 0.0
        rule = self.params.stream
        if not self.pending_ids or len(self.pending_ids) < rule.tokens:
            return None
        if rule.ms and self.sent_at is not None:
            return max(0.0, self.sent_at + rule.ms / 1000 - time.perf_counter())
        return 0.0

    def poll(self) -> TokenEvent | float | None:
        """The event due now, else seconds until one is (None: once tokens come).

        Raises the engine's error once what was made before it has been taken.
        """
        wait = self._wait_s()
        if self.error is not None:  # what was made before the failure goes first
            wait = 0.0 if self.pending_ids else None
        if wait != 0.0:
            if self.error is not None:
                raise self.error
            return wait
        final = self.finish is not None
        event = TokenEvent(
            text="".join(self.pending_text),
            token_ids=tuple(self.pending_ids),
            finish_reason=self.finish,
            prompt_tokens=len(self.params.prompt_ids) if final else 0,
            completion_tokens=self.tokens if final else 0,
            token_times_us=tuple(self.pending_times),
        )
        self.pending_text.clear()
        self.pending_ids.clear()
        self.pending_times.clear()
        self.sent_at = time.perf_counter()
        return event

    async def next_event(self) -> TokenEvent:
        """Everything produced since the last call, as one event; raises the engine's error."""
        while True:
            got = self.poll()
            if isinstance(got, TokenEvent):
                return got
            self.ready.clear()
            if got is None:
                await self.ready.wait()
            else:  # tokens are in, the interval is not over: wait for it (or the finish)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ready.wait(), got)


class _Inbox:
    """Event loop -> worker: requests to admit and cancellations, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._joins: deque[tuple[int, GenerateParams]] = deque()
        self._cancels: list[int] = []
        self._closing = False  # finish what is admitted and queued, then end
        self._aborting = False  # end now

    def __len__(self) -> int:
        with self._lock:
            return len(self._joins)

    def join(self, seq_id: int, params: GenerateParams) -> None:
        with self._lock:
            self._joins.append((seq_id, params))
            self._lock.notify()

    def cancel(self, seq_id: int) -> None:
        """Withdraw `seq_id` if it still waits, else ask the worker to free its slot."""
        with self._lock:
            for i, (queued, _) in enumerate(self._joins):
                if queued == seq_id:
                    del self._joins[i]
                    return
            self._cancels.append(seq_id)
            self._lock.notify()

    def close(self, *, abort: bool) -> None:
        with self._lock:
            self._closing = True
            self._aborting = self._aborting or abort
            if abort:
                self._joins.clear()
            self._lock.notify()

    # -- worker side -------------------------------------------------------------------

    def closing(self) -> bool:
        with self._lock:
            return self._closing

    def aborting(self) -> bool:
        with self._lock:
            return self._aborting

    def take_cancels(self) -> list[int]:
        with self._lock:
            cancels, self._cancels = self._cancels, []
            return cancels

    def take_joins(self, n: int) -> list[tuple[int, GenerateParams]]:
        with self._lock:
            return [self._joins.popleft() for _ in range(min(n, len(self._joins)))]

    def wait(self) -> None:
        """Sleep until there is something to take or the engine closes."""
        with self._lock:
            while not (self._joins or self._cancels or self._closing):
                self._lock.wait()


class DecoderScheduler(Engine):
    """One worker thread stepping one DecoderCore per decoder model."""

    kind = "decoder"

    def __init__(
        self,
        name: str,
        backend: DecoderBackend,
        tokenizer: Tokenizer,
        *,
        max_batch: int,
        max_queue: int,
        eos_token_id: int | None,
        max_context: int,
    ) -> None:
        super().__init__(name)
        self.backend = backend
        self.num_slots = max(1, min(max_batch, backend.max_slots))
        self.max_queue = max(0, max_queue)
        self.eos_token_id = eos_token_id
        self.max_context = min(max_context, backend.max_context)
        self.core = DecoderCore(
            name,
            backend,
            tokenizer,
            num_slots=self.num_slots,
            eos_token_id=eos_token_id,
            max_context=self.max_context,
        )
        self._inbox = _Inbox()
        self._live: dict[int, Stream] = {}  # submitted and not finished, by seq_id
        self._ids = itertools.count()
        self._running = 0  # StepOutput.running of the latest step delivered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handed = threading.Event()  # the latest admitting step's first tokens are out
        self.first_token_handoff_s = FIRST_TOKEN_HANDOFF_S
        m = name
        self._queue_gauge = metrics.QUEUE_DEPTH.labels(m)
        self._slots_gauge = metrics.ACTIVE_SLOTS.labels(m)
        self._batch_hist = metrics.BATCH_SIZE.labels(m)
        self._prefill_hist = metrics.BACKEND_DURATION.labels(m, "prefill")
        self._decode_hist = metrics.BACKEND_DURATION.labels(m, "decode")
        self._ttft = metrics.TIME_TO_FIRST_TOKEN.labels(m)
        self._itl = metrics.INTER_TOKEN_LATENCY.labels(m)
        self._generated = metrics.GENERATED_TOKENS.labels(m)
        self._prompt_tokens = metrics.PROMPT_TOKENS.labels(m)

    @property
    def active_slots(self) -> int:
        return self._running

    @property
    def queue_depth(self) -> int:
        return len(self._inbox)

    def submit(self, params: GenerateParams) -> Stream:
        """Queue a request; raises QueueFull (slots and queue full) or ShuttingDown at once."""
        self._check_open()
        if not 0 < len(params.prompt_ids) < self.max_context:  # GeneratorModel.prepare's job
            raise ValueError(
                f"prompt of {len(params.prompt_ids)} tokens, context {self.max_context}"
            )
        if len(self._live) >= self.num_slots + self.max_queue:
            raise QueueFull(
                f"model {self.name!r}: every slot is busy and the queue is full; retry later",
                # one unit = one sequence's life; the queue ahead shares the slots
                self.retry_after_s(len(self._inbox) / self.num_slots + 1),
            )
        stream = Stream(seq_id=next(self._ids), params=params, arrival=time.perf_counter())
        self._live[stream.seq_id] = stream
        self._inbox.join(stream.seq_id, params)
        self._queue_gauge.set(len(self._inbox))
        return stream

    def cancel(self, stream: Stream) -> None:
        """The consumer went away: leave the queue now, or free the slot at the next step."""
        if self._live.pop(stream.seq_id, None) is None:
            return  # finished, failed or cancelled already
        self._inbox.cancel(stream.seq_id)
        self._queue_gauge.set(len(self._inbox))

    # -- Engine ------------------------------------------------------------------------------

    def _warm_up(self) -> None:
        self.backend.prefill(0, [self.eos_token_id or 0])
        self.backend.release(0)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._in_worker(self._work)

    def _abandon(self, error: ShuttingDown) -> None:
        for stream in self._live.values():
            stream.fail(error)
        self._live.clear()
        self._inbox.close(abort=True)  # the worker releases every slot and ends
        self._queue_gauge.set(0)

    def _on_close(self) -> None:
        self._inbox.close(abort=False)

    # -- worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        """The step loop: until closed and done (or aborted)."""
        core, inbox, loop = self.core, self._inbox, self._loop
        assert loop is not None
        index = 0
        while True:
            if inbox.aborting():
                core.release_all()
                loop.call_soon_threadsafe(self._deliver, StepOutput(index, time.perf_counter()))
                return
            cancelled = core.cancel(inbox.take_cancels())
            joins = inbox.take_joins(core.free_slots)
            if not (cancelled or joins or core.running):
                if inbox.closing():
                    return
                inbox.wait()
                continue
            out = core.step(index, joins, cancelled)
            self._handed.clear()
            loop.call_soon_threadsafe(self._deliver, out)
            index += 1
            if out.admitted and core.running <= FIRST_TOKEN_HANDOFF_ROWS:
                self._handed.wait(self.first_token_handoff_s)

    # -- event loop --------------------------------------------------------------------------

    def _deliver(self, out: StepOutput) -> None:
        """Hand each stream its tokens, record metrics."""
        for seconds in out.prefill_s:
            self._prefill_hist.observe(seconds)
        if out.decode_s is not None:
            self._decode_hist.observe(out.decode_s)
            self._batch_hist.observe(out.decode_rows)
        self._generated.inc(len(out.tokens))
        for t in out.tokens:
            stream = self._live.get(t.seq_id)
            if stream is None:
                continue  # cancelled: this step ran before the worker read the cancel
            if stream.first_at is None:
                stream.first_at, stream.admitted_at = out.at, out.started
                self._ttft.observe(out.at - stream.arrival)
                self._prompt_tokens.inc(len(stream.params.prompt_ids))
            else:
                self._itl.observe(out.at - stream.last_at)
            stream.last_at = out.at
            stream.push(t.text, t.token, t.finish, out.at)
            if t.finish is not None:
                del self._live[t.seq_id]
                self._observe_unit(out.at - stream.arrival)
        for seq_id, exc in out.failed:
            log.error("generation failed", model=self.name, exc_info=exc)
            failed = self._live.pop(seq_id, None)
            if failed is not None:
                failure = BackendFailure(BACKEND_FAILED)
                failure.__cause__ = exc
                failed.fail(failure)
        self._running = out.running
        self._slots_gauge.set(out.running)
        self._queue_gauge.set(len(self._inbox))
        if out.admitted:  # after the consumers woken above have taken their first tokens
            asyncio.get_running_loop().call_soon(self._handed.set)

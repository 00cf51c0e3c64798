"""Dynamic batching for encoders: many callers, one backend call per batch.

Callers submit one or more rows (a text, or the token ids of one) and await a
future. One loop per model collects rows until `max_batch` rows are waiting or
the oldest request has waited `max_delay_ms`; the batcher's own worker thread
then tokenizes the batch's texts in one tokenizer call (`tokenize`), sorts the
rows by length and cuts them into groups whose padding stays under
`max_padding` of their tokens, runs one `backend.forward` per group, and the
loop scatters the logits back. The event loop does no per-text tokenization
and stays free for health checks and new calls; a call refused for a full
queue is refused before any of its texts is tokenized. A request with more
rows than `max_batch` spans several batches; a caller that went away has its
rows skipped if they have not started. Start and stop are
server/engine/base.py's.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import structlog
from headrace.server import metrics, tracing
from headrace.server.backends.base import EncoderBackend
from headrace.server.engine.base import Engine
from headrace.server.types import BackendFailure, QueueFull, ShuttingDown

if TYPE_CHECKING:
    from opentelemetry.context import Context

log = structlog.get_logger(__name__)

BACKEND_FAILED = "the model failed while running this batch"

# A row: a text (tokenized in the worker thread, with its batch) or its token ids.
Row: TypeAlias = str | Sequence[int]
# texts -> (token ids, truncated to max_length) each; run in the worker thread.
Tokenize: TypeAlias = Callable[[list[str]], list[tuple[list[int], bool]]]


@dataclass(frozen=True, slots=True)
class Encoded:
    """One request's answer: its rows' logits and what the model saw of each row."""

    logits: np.ndarray  # float32 [rows, labels]
    tokens: list[int]  # tokens of each row as the model saw them (after truncation)
    truncated: list[bool]  # whether `tokenize` cut the row (False for rows sent as ids)


def length_groups(lengths: Sequence[int], max_padding: float) -> list[list[int]]:
    """Row indices sorted by length, cut so that padding to each group's longest row
    stays under `max_padding` of the group's tokens -> [[row, ...], ...]."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0  # tokens of the rows in `group`
    for i in order:
        n = lengths[i]  # the longest so far: rows come shortest first
        width_tokens = n * (len(group) + 1)
        if group and width_tokens - (real + n) > max_padding * width_tokens:
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += n
    if group:
        groups.append(group)
    return groups


@dataclass(eq=False, slots=True)
class _Request:
    rows: Sequence[Row]  # texts, or token ids already truncated
    future: asyncio.Future[Encoded]
    arrival: float  # loop.time() at submit, starts the max_delay clock
    logits: np.ndarray | None = None  # filled batch by batch (a request over several)
    tokens: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    next_row: int = 0  # first row not yet sent to a batch
    done_rows: int = 0  # rows whose logits are in
    trace: Context | None = None  # the caller's OpenTelemetry context while tracing is on (server/tracing.py)

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # cancelled by its caller, or failed


@dataclass
class _Batch:
    # (request, first row, end row) for each slice of a request in this batch
    parts: list[tuple[_Request, int, int]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Output:
    """What the worker thread hands back for a batch, row by row in batch order."""

    logits: np.ndarray  # float32 [rows, labels]
    tokens: list[int]
    truncated: list[bool]
    forward_s: float  # the backend calls alone
    seconds: float  # tokenize + forward: the batch's unit time, for retry hints


class EncoderBatcher(Engine):
    """One batching loop and one worker thread per encoder model."""

    kind = "encoder"

    def __init__(
        self,
        name: str,
        backend: EncoderBackend,
        *,
        max_batch: int,
        max_delay_ms: float,
        max_queue: int,
        max_padding: float = 0.1,
        pad_id: int,
        max_length: int,
        tokenize: Tokenize | None = None,
    ) -> None:
        super().__init__(name)
        self.backend = backend
        self.max_batch = max(1, max_batch)
        self.max_delay = max(0.0, max_delay_ms) / 1000.0
        self.max_queue = max(1, max_queue)
        self.max_padding = max_padding
        self.pad_id = pad_id
        self.max_length = max_length
        self.tokenize = tokenize  # needed for text rows
        self._queue: deque[_Request] = deque()
        self._rows_waiting = 0  # rows in the queue not yet sent to a batch
        self._wake = asyncio.Event()
        self._queue_gauge = metrics.QUEUE_DEPTH.labels(name)
        self._batch_hist = metrics.BATCH_SIZE.labels(name)
        self._forward_hist = metrics.BACKEND_DURATION.labels(name, "forward")

    @property
    def queue_depth(self) -> int:
        return sum(1 for r in self._queue if not r.abandoned)

    def _warm_up(self) -> None:
        ids = np.full((1, 8), self.pad_id, dtype=np.int64)
        self.backend.forward(ids, np.ones_like(ids))

    def _abandon(self, error: ShuttingDown) -> None:
        while self._queue:
            req = self._queue.popleft()
            if not req.future.done():
                req.future.set_exception(error)
        self._rows_waiting = 0
        self._queue_gauge.set(0)

    def _on_close(self) -> None:
        self._wake.set()

    async def submit(self, rows: Sequence[Row]) -> Encoded:
        """rows: texts (tokenized with their batch) or token ids -> logits [len(rows), labels].

        Raises QueueFull at once when max_queue requests wait (before any tokenizing),
        ShuttingDown when stopping (or not started), BackendFailure when a batch holding
        a row failed (tokenizing included).
        """
        self._check_open()
        if len(self._queue) >= self.max_queue:
            raise QueueFull(
                f"model {self.name!r} has {self.max_queue} requests waiting; retry later",
                self.retry_after_s(self._rows_waiting / self.max_batch + 1),
            )
        loop = asyncio.get_running_loop()
        req = _Request(rows, loop.create_future(), loop.time())
        req.trace = tracing.current()
        self._queue.append(req)
        self._rows_waiting += len(req.rows)
        self._queue_gauge.set(len(self._queue))
        self._wake.set()
        return await req.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned_head()
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # wait for a full batch, or until the oldest request has waited max_delay
            while self._rows_waiting < self.max_batch and not self._closing:
                left = self._queue[0].arrival + self.max_delay - loop.time()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
                self._drop_abandoned_head()
                if not self._queue:
                    break
            batch = self._take()
            if batch.rows:
                await self._execute(batch)

    def _drop_abandoned_head(self) -> None:
        while self._queue and self._queue[0].abandoned:
            req = self._queue.popleft()
            self._rows_waiting -= len(req.rows) - req.next_row
        self._queue_gauge.set(len(self._queue))

    def _take(self) -> _Batch:
        """Pop up to max_batch rows in arrival order, skipping abandoned requests."""
        batch = _Batch()
        while self._queue and len(batch.rows) < self.max_batch:
            req = self._queue[0]
            left = len(req.rows) - req.next_row
            if req.abandoned:
                self._queue.popleft()
                self._rows_waiting -= left
                continue
            n = min(left, self.max_batch - len(batch.rows))
            start = req.next_row
            batch.parts.append((req, start, start + n))
            batch.rows.extend(req.rows[start : start + n])
            req.next_row += n
            self._rows_waiting -= n
            if req.next_row == len(req.rows):
                self._queue.popleft()
        self._queue_gauge.set(len(self._queue))
        return batch

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """rows -> input_ids, attention_mask int64 [B, S], S the longest row; padding has mask 0."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def _token_ids(self, rows: Sequence[Row]) -> tuple[list[Sequence[int]], list[bool]]:
        """Worker thread: the batch's texts tokenized in one call -> (ids, truncated) per row."""
        ids: list[Sequence[int]] = []
        truncated = [False] * len(rows)
        texts: list[str] = []
        where: list[int] = []  # the row of each text
        for i, row in enumerate(rows):
            if isinstance(row, str):
                texts.append(row)
                where.append(i)
                row = ()
            ids.append(row)
        if texts:
            if self.tokenize is None:
                raise TypeError("text rows need the batcher's tokenize")
            for i, (row_ids, cut) in zip(where, self.tokenize(texts), strict=True):
                ids[i], truncated[i] = row_ids, cut
        return ids, truncated

    def _forward(self, rows: Sequence[Row]) -> _Output:
        """Worker thread: tokenize, then one backend.forward per length group."""
        t0 = time.perf_counter()
        ids, truncated = self._token_ids(rows)
        tokens = [len(r) for r in ids]
        out: np.ndarray | None = None
        forward_s = 0.0
        for group in length_groups(tokens, self.max_padding):
            input_ids, mask = self.pad([ids[i] for i in group])
            t1 = time.perf_counter()
            logits = np.asarray(self.backend.forward(input_ids, mask), dtype=np.float32)
            forward_s += time.perf_counter() - t1
            if logits.ndim != 2 or logits.shape[0] != len(group):  # [G, labels]
                raise ValueError(f"backend returned logits of shape {logits.shape}")
            if out is None:
                out = np.empty((len(rows), logits.shape[1]), dtype=np.float32)
            out[group] = logits
        assert out is not None
        return _Output(out, tokens, truncated, forward_s, time.perf_counter() - t0)

    async def _execute(self, batch: _Batch) -> None:
        trace = tracing.batch(self.name, batch.parts, len(batch.rows))  # None: tracing off
        try:
            out = await self._in_worker(self._forward, batch.rows)
        except Exception as exc:
            if trace is not None:
                trace.failed(exc)
            if len(batch.parts) > 1:  # one request's texts must not fail the others: each alone
                log.warning("encoder batch failed; its requests retried one by one",
                            model=self.name, rows=len(batch.rows), error=type(exc).__name__)  # fmt: skip
                at = 0
                for part in batch.parts:
                    n = part[2] - part[1]
                    await self._execute(_Batch([part], batch.rows[at : at + n]))
                    at += n
                return
            log.error("encoder batch failed", model=self.name, rows=len(batch.rows), exc_info=exc)
            for req, _, _ in batch.parts:
                if not req.future.done():
                    failure = BackendFailure(BACKEND_FAILED)
                    failure.__cause__ = exc
                    req.future.set_exception(failure)
            return
        if trace is not None:
            trace.done(out.forward_s)
        self._batch_hist.observe(len(batch.rows))
        self._forward_hist.observe(out.forward_s)
        self._observe_unit(out.seconds)
        logits, tokens, truncated = out.logits, out.tokens, out.truncated
        at = 0
        for req, start, end in batch.parts:
            a, at = at, at + end - start
            if req.future.done():
                continue
            n = len(req.rows)
            if start == 0 and end == n:  # the whole request in this batch (the common case)
                req.future.set_result(Encoded(logits[a:at], tokens[a:at], truncated[a:at]))
                continue
            if req.logits is None:
                req.logits = np.empty((n, logits.shape[1]), dtype=np.float32)
            req.logits[start:end] = logits[a:at]
            req.tokens += tokens[a:at]
            req.truncated += truncated[a:at]
            req.done_rows += end - start
            if req.done_rows == n:
                req.future.set_result(Encoded(req.logits, req.tokens, req.truncated))

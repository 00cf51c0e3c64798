"""A front end's connection to its engine process: one Unix socket, every call on it.

    client = EngineClient(path, on_catalog=...)     # on_catalog(dict | None): None = lost
    await client.start()                            # connected, first catalog applied
    logits, tokens = await client.classify("sentiment", "3", [[101, 2204, 102]])
    async for event in client.generate("gpt", "1", params): ...  # TokenEvents

Each call has an id of this connection; its answers come back under it. A classify
call waits on one future; a generation on a queue of events that the consumer takes
all at once when it is behind (several steps in one event, as the in-process stream
coalesces). A generation closed before its last event sends CANCEL. When the
connection drops (the engine died or restarts), every call in flight fails with
ModelUnavailable (UNAVAILABLE: retryable), `on_catalog(None)` is told, and the client
reconnects until it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from headrace.server.engine_ipc import wire
from headrace.server.errors import ModelUnavailable
from headrace.server.logs import get_logger
from headrace.server.types import GenerateParams, TokenEvent

log = get_logger("headrace.engine_client")

RECONNECT_S = 0.1
LOST = "the engine process is restarting; retry"


class _Sequence:
    """One generation's events as they arrive; the consumer takes them all at once."""

    def __init__(self) -> None:
        self.events: deque[TokenEvent] = deque()
        self.error: BaseException | None = None
        self.finished = False
        self.ready = asyncio.Event()

    def push(self, event: TokenEvent) -> None:
        self.events.append(event)
        if event.finish_reason is not None:
            self.finished = True
        self.ready.set()

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.error = error
            self.finished = True
            self.ready.set()

    async def take(self) -> TokenEvent:
        while not self.events:
            if self.error is not None:
                raise self.error
            self.ready.clear()
            await self.ready.wait()
        if len(self.events) == 1:
            return self.events.popleft()
        events = list(self.events)
        self.events.clear()
        last = events[-1]
        return TokenEvent(
            text="".join(e.text for e in events),
            token_ids=tuple(t for e in events for t in e.token_ids),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            token_times_us=tuple(t for e in events for t in e.token_times_us),
        )


class EngineClient:
    def __init__(
        self, path: Path, on_catalog: Callable[[dict[str, Any] | None], Awaitable[None]]
    ) -> None:
        self.path = path
        self.on_catalog = on_catalog
        self._ids = itertools.count(1)
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._sequences: dict[int, _Sequence] = {}
        self._sender: wire.Sender | None = None
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._sender is not None

    async def start(self, timeout_s: float | None = None) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-client")
        async with asyncio.timeout(timeout_s):
            await self._first.wait()

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(ModelUnavailable("the front end is stopping"))

    async def _run(self) -> None:
        while not self._closed:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            self._sender = wire.Sender(writer)
            log.info("engine_connected", socket=str(self.path))
            try:
                await self._read(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                self._sender = None
                writer.close()
                self._fail_all(ModelUnavailable(LOST))
            if not self._closed:
                log.warning("engine_connection_lost", socket=str(self.path))
                await self.on_catalog(None)
                await asyncio.sleep(RECONNECT_S)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            kind, call_id, body = await wire.read_frame(reader)
            if kind == wire.TOKENS:
                seq = self._sequences.get(call_id)
                if seq is not None:
                    event = wire.parse_tokens(body)
                    seq.push(event)
                    if event.finish_reason is not None:
                        del self._sequences[call_id]
            elif kind == wire.SCORES:
                future = self._futures.pop(call_id, None)
                if future is not None and not future.done():
                    future.set_result(wire.parse_scores(body))
            elif kind == wire.ERROR:
                error = wire.parse_error(body)
                future = self._futures.pop(call_id, None)
                if future is not None and not future.done():
                    future.set_exception(error)
                seq = self._sequences.pop(call_id, None)
                if seq is not None:
                    seq.fail(error)
            elif kind == wire.PONG:
                future = self._futures.pop(call_id, None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif kind == wire.CATALOG:
                await self.on_catalog(json.loads(bytes(body)))
                self._first.set()

    def _fail_all(self, error: BaseException) -> None:
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(error)
        sequences, self._sequences = self._sequences, {}
        for seq in sequences.values():
            seq.fail(error)

    def _send(self, data: bytes) -> None:
        if self._sender is None:
            raise ModelUnavailable(LOST)
        self._sender.send(data)

    async def _call(self, make: Callable[[int], bytes]) -> Any:
        call_id = next(self._ids)
        self._send(make(call_id))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[call_id] = future
        try:
            return await future
        except asyncio.CancelledError:
            self._futures.pop(call_id, None)
            with contextlib.suppress(ModelUnavailable):
                self._send(wire.frame(wire.CANCEL, call_id))
            raise

    async def classify(
        self, model: str, version: str, rows: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, list[int]]:
        """Rows of token ids -> (logits [rows, labels], tokens per row), batched in the engine."""
        result: tuple[np.ndarray, list[int]] = await self._call(
            lambda i: wire.classify_frame(i, model, version, rows)
        )
        return result

    async def ping(self) -> None:
        """An empty round trip through the engine's event loop (the IPC's own cost)."""
        await self._call(lambda i: wire.frame(wire.PING, i))

    async def generate(
        self, model: str, version: str, params: GenerateParams
    ) -> AsyncGenerator[TokenEvent, None]:
        call_id = next(self._ids)
        self._send(wire.generate_frame(call_id, model, version, params))
        seq = _Sequence()
        self._sequences[call_id] = seq
        try:
            while True:
                event = await seq.take()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                self._sequences.pop(call_id, None)
                with contextlib.suppress(ModelUnavailable):
                    self._send(wire.frame(wire.CANCEL, call_id))

"""A front end's Classify tokenization, off its event loop and batched.

In one process the EncoderBatcher tokenizes each batch on its worker thread; a front end
of an engine process sends ids, so it tokenizes itself. `TokenizeQueue` does it as the
batcher does: the texts of every call that comes while a batch is being tokenized wait
and go together, in one `encode_batch` on one worker thread (the tokenizers library
releases the GIL there, so the event loop runs on meanwhile). A call that finds nothing
queued or running is tokenized on the loop at once: a lone caller pays no thread hop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence

Encoded = list[tuple[list[int], bool]]  # per text: token ids, truncated


class TokenizeQueue:
    def __init__(self, tokenize: Callable[[list[str]], Encoded], name: str) -> None:
        self.tokenize = tokenize
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"tokenize-{name}")
        self._waiting: list[tuple[Sequence[str], asyncio.Future[Encoded]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False  # the version retired: what still comes is tokenized here

    async def encode(self, texts: Sequence[str], *, alone: bool) -> Encoded:
        """`alone`: no other call of this model is running (tokenized here, at once)."""
        if (alone and self._drainer is None) or self._closed:
            return self.tokenize(list(texts))
        future: asyncio.Future[Encoded] = asyncio.get_running_loop().create_future()
        self._waiting.append((texts, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                texts = [t for call, _ in batch for t in call]
                try:
                    encoded = await self._in_thread(texts)
                except Exception as exc:  # every call of the batch gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for call, future in batch:
                    if not future.done():  # a cancelled caller's rows are dropped
                        future.set_result(encoded[start : start + len(call)])
                    start += len(call)
        finally:
            self._drainer = None

    async def _in_thread(self, texts: list[str]) -> Encoded:
        if not self._closed:
            try:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._pool, self.tokenize, texts)
            except RuntimeError:  # the pool shut down meanwhile: below
                if not self._closed:
                    raise
        return self.tokenize(texts)

    def close(self) -> None:
        """No new work for the thread (what it runs finishes); it exits when idle."""
        self._closed = True
        self._pool.shutdown(wait=False)

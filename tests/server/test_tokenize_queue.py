"""A front end's Classify tokenization (server/engine_ipc/tokenize.py): calls that come
together share one tokenizer call on the worker thread, each gets its own rows back,
a lone call is tokenized at once on the loop, a failure reaches every call it held."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from headrace.server.engine_ipc.tokenize import Encoded, TokenizeQueue


class Recorder:
    """A tokenizer stand-in: one id per character, every call's texts and thread kept."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[list[str], str]] = []
        self.fail_on = fail_on
        self.release = threading.Event()
        self.release.set()

    def __call__(self, texts: list[str]) -> Encoded:
        self.release.wait(5)
        self.calls.append((list(texts), threading.current_thread().name))
        if self.fail_on in texts:
            raise RuntimeError("tokenizer broke")
        return [([ord(c) for c in t], len(t) > 3) for t in texts]


def on_a_loop(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(fn)
    def test() -> None:
        asyncio.run(fn())

    return test


def expected(texts: list[str]) -> Encoded:
    return [([ord(c) for c in t], len(t) > 3) for t in texts]


@contextlib.contextmanager
def queue_of(tok: Recorder) -> Iterator[TokenizeQueue]:
    queue = TokenizeQueue(tok, "m")
    try:
        yield queue
    finally:
        queue.close()


async def behind_a_batch(
    queue: TokenizeQueue, tok: Recorder, *calls: list[str]
) -> tuple[asyncio.Task[Encoded], list[asyncio.Task[Encoded]]]:
    """A call of ["a"] held on the worker thread, then `calls` queued behind it; they run
    once `tok.release` is set."""
    tok.release.clear()
    first = asyncio.create_task(queue.encode(["a"], alone=False))
    await asyncio.sleep(0.02)
    rest = [asyncio.create_task(queue.encode(c, alone=False)) for c in calls]
    await asyncio.sleep(0.02)
    return first, rest


@on_a_loop
async def test_concurrent_calls_share_a_batch_and_get_their_own_rows() -> None:
    tok = Recorder()
    with queue_of(tok) as queue:
        tok.release.clear()  # the first batch waits: the other calls pile up meanwhile
        calls = [[f"t{i}", f"text{i}"] if i % 2 else [f"x{i}"] for i in range(20)]
        tasks = [asyncio.create_task(queue.encode(c, alone=False)) for c in calls]
        await asyncio.sleep(0.05)
        tok.release.set()
        results = await asyncio.gather(*tasks)
        assert results == [expected(c) for c in calls]  # each call its own rows, in order
        assert len(tok.calls) < len(calls)  # batched: the first alone, the rest together
        assert sum(len(texts) for texts, _ in tok.calls) == sum(len(c) for c in calls)
        assert all(name.startswith("tokenize-m") for _, name in tok.calls)  # off the loop


@on_a_loop
async def test_a_lone_call_is_tokenized_on_the_loop() -> None:
    tok = Recorder()
    with queue_of(tok) as queue:
        assert await queue.encode(["hello"], alone=True) == expected(["hello"])
        assert tok.calls == [(["hello"], threading.current_thread().name)]


@on_a_loop
async def test_a_failure_reaches_each_call_of_its_batch_and_the_next_batch_runs() -> None:
    tok = Recorder(fail_on="boom")
    with queue_of(tok) as queue:
        first, rest = await behind_a_batch(queue, tok, ["boom"], ["c"])  # these two together
        tok.release.set()
        assert await first == expected(["a"])
        for task in rest:
            with pytest.raises(RuntimeError, match="tokenizer broke"):
                await task
        assert await queue.encode(["after"], alone=False) == expected(["after"])


@on_a_loop
async def test_a_cancelled_caller_leaves_the_others_served() -> None:
    tok = Recorder()
    with queue_of(tok) as queue:
        first, (gone, kept) = await behind_a_batch(queue, tok, ["gone"], ["kept"])
        gone.cancel()
        tok.release.set()
        assert await first == expected(["a"]) and await kept == expected(["kept"])
        with pytest.raises(asyncio.CancelledError):
            await gone


@on_a_loop
async def test_closed_with_calls_waiting_still_answers_them() -> None:
    tok = Recorder()
    queue = TokenizeQueue(tok, "m")
    first, (waiting,) = await behind_a_batch(queue, tok, ["b"])
    queue.close()  # the version retired while its calls run
    tok.release.set()
    assert await first == expected(["a"]) and await waiting == expected(["b"])
    assert await queue.encode(["late"], alone=False) == expected(["late"])  # on the loop
    assert tok.calls[-1] == (["late"], threading.current_thread().name)

"""A front end's Classify tokenization (server/engine_ipc/tokenize.py): calls that come
together share one tokenizer call on the worker thread, each gets its own rows back,
a lone call is tokenized at once on the loop, a failure reaches every call it held."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
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


@on_a_loop
async def test_concurrent_calls_share_a_batch_and_get_their_own_rows() -> None:
    tok = Recorder()
    queue = TokenizeQueue(tok, "m")
    try:
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
    finally:
        queue.close()


@on_a_loop
async def test_a_lone_call_is_tokenized_on_the_loop() -> None:
    tok = Recorder()
    queue = TokenizeQueue(tok, "m")
    try:
        assert await queue.encode(["hello"], alone=True) == expected(["hello"])
        assert tok.calls == [(["hello"], threading.current_thread().name)]
    finally:
        queue.close()


@on_a_loop
async def test_a_failure_reaches_each_call_of_its_batch_and_the_next_batch_runs() -> None:
    tok = Recorder(fail_on="boom")
    queue = TokenizeQueue(tok, "m")
    try:
        tok.release.clear()
        first = asyncio.create_task(queue.encode(["a"], alone=False))
        await asyncio.sleep(0.02)  # the first batch is running: these two go together
        second = asyncio.create_task(queue.encode(["boom"], alone=False))
        third = asyncio.create_task(queue.encode(["c"], alone=False))
        await asyncio.sleep(0.02)
        tok.release.set()
        assert await first == expected(["a"])
        for task in (second, third):
            with pytest.raises(RuntimeError, match="tokenizer broke"):
                await task
        assert await queue.encode(["after"], alone=False) == expected(["after"])
    finally:
        queue.close()


@on_a_loop
async def test_a_cancelled_caller_leaves_the_others_served() -> None:
    tok = Recorder()
    queue = TokenizeQueue(tok, "m")
    try:
        tok.release.clear()
        first = asyncio.create_task(queue.encode(["a"], alone=False))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(queue.encode(["gone"], alone=False))
        kept = asyncio.create_task(queue.encode(["kept"], alone=False))
        await asyncio.sleep(0.02)
        gone.cancel()
        tok.release.set()
        assert await first == expected(["a"]) and await kept == expected(["kept"])
        with pytest.raises(asyncio.CancelledError):
            await gone
    finally:
        queue.close()


@on_a_loop
async def test_closed_with_calls_waiting_still_answers_them() -> None:
    tok = Recorder()
    queue = TokenizeQueue(tok, "m")
    tok.release.clear()
    first = asyncio.create_task(queue.encode(["a"], alone=False))
    await asyncio.sleep(0.02)
    waiting = asyncio.create_task(queue.encode(["b"], alone=False))
    await asyncio.sleep(0.02)
    queue.close()  # the version retired while its calls run
    tok.release.set()
    assert await first == expected(["a"]) and await waiting == expected(["b"])
    assert await queue.encode(["late"], alone=False) == expected(["late"])  # on the loop
    assert tok.calls[-1] == (["late"], threading.current_thread().name)

"""The encoder batcher with a recording EncoderBackend.

`SumEncoder` scores each row from its unmasked tokens alone, so a row's
result shows whether padding leaked into it; it records every batch shape.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest
from headrace.server.engine.batcher import Encoded, EncoderBatcher, length_groups
from headrace.server.types import BackendFailure, QueueFull, ShuttingDown

PAD = 7


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


class SumEncoder:
    name = "sum"
    precision = "fp32"
    device = "cpu"

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []  # (rows, padded length) per forward
        self.fail_next = 0
        self.gate = threading.Event()  # forward waits on it
        self.gate.set()
        self.entered = threading.Event()  # set when a forward starts

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(input_ids.shape)
        assert input_ids.dtype == np.int64 and attention_mask.shape == input_ids.shape
        assert (input_ids[attention_mask == 0] == PAD).all()  # padding uses the pad id
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("forward exploded at /secret/path")
        real = np.where(attention_mask == 1, input_ids, 0)
        # [B, 2]: sum of tokens, number of tokens
        return np.stack([real.sum(1), attention_mask.sum(1)], axis=1).astype(np.float32)

    def close(self) -> None:
        pass


class Tokens:
    """A tokenizer for text rows: "3 4 5" -> [3, 4, 5], cut to `limit`; records its calls."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.calls: list[tuple[list[str], str]] = []  # (texts, thread name) per call
        self.fail_next = 0
        self.poison: str | None = None  # a text the tokenizer always fails on

    def __call__(self, texts: list[str]) -> list[tuple[list[int], bool]]:
        self.calls.append((list(texts), threading.current_thread().name))
        if self.poison in texts:
            raise RuntimeError("tokenizer exploded")
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("tokenizer exploded")
        rows = [[int(t) for t in text.split()] for text in texts]
        return [(r[: self.limit], len(r) > self.limit) for r in rows]


def make(max_batch: int = 4, max_queue: int = 16, delay_ms: float = 20.0, tokenize=None):
    backend = SumEncoder()
    batcher = EncoderBatcher(
        "sum",
        backend,
        max_batch=max_batch,
        max_delay_ms=delay_ms,
        max_queue=max_queue,
        pad_id=PAD,
        max_length=64,
        tokenize=tokenize,
    )
    return batcher, backend


def expected(rows: list[list[int]]) -> np.ndarray:
    return np.array([[sum(r), len(r)] for r in rows], dtype=np.float32)


def test_length_groups_bound_padding_and_cover_every_row() -> None:
    lengths = [30, 4, 5, 31, 4, 12, 29, 6]
    groups = length_groups(lengths, 0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        width = max(lengths[i] for i in g)
        real = sum(lengths[i] for i in g)
        assert width * len(g) - real <= 0.25 * width * len(g)
    assert [sorted(lengths[i] for i in g) for g in groups] == [[4, 4, 5, 6], [12], [29, 30, 31]]
    assert length_groups(lengths, 1.0) == [sorted(range(8), key=lengths.__getitem__)]


def test_concurrent_callers_share_a_batch_and_get_their_own_rows() -> None:
    batcher, backend = make(max_batch=8)
    batcher.max_padding = 1.0  # one forward per batch, whatever the lengths
    requests = [[[1, 2, 3]], [[4] * 10, [5]], [[6, 6]], [[9] * 20]]

    async def main() -> list[Encoded]:
        await batcher.start()
        backend.batches.clear()  # forget the warm-up
        out = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.stop()
        return list(out)

    for rows, out in zip(requests, run(main()), strict=True):
        np.testing.assert_array_equal(out.logits, expected(rows))
        assert out.tokens == [len(r) for r in rows] and out.truncated == [False] * len(rows)
    assert max(rows for rows, _ in backend.batches) > 1


def test_a_large_request_spans_several_batches() -> None:
    batcher, backend = make(max_batch=4)
    batcher.max_padding = 1.0  # one forward per batch: count batches, not length groups
    rows = [[i + 1] * (i + 1) for i in range(10)]

    async def main() -> Encoded:
        await batcher.start()
        backend.batches.clear()
        out = await batcher.submit(rows)
        await batcher.stop()
        return out

    out = run(main())
    np.testing.assert_array_equal(out.logits, expected(rows))
    assert out.tokens == [len(r) for r in rows]
    assert [b for b, _ in backend.batches] == [4, 4, 2]


def test_full_queue_is_refused_at_once() -> None:
    batcher, backend = make(max_batch=1, max_queue=2)

    async def main() -> None:
        await batcher.start()
        backend.gate.clear()
        backend.entered.clear()
        running = asyncio.create_task(batcher.submit([[1]]))
        await asyncio.get_running_loop().run_in_executor(None, backend.entered.wait, 10)
        waiting = [asyncio.create_task(batcher.submit([[2]])) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit([[3]])
        backend.gate.set()
        await asyncio.gather(running, *waiting)
        await batcher.stop()

    run(main())


def test_backend_failure_fails_only_that_batch() -> None:
    batcher, backend = make(max_batch=2, delay_ms=0.0)

    async def main() -> tuple[BaseException | Encoded, np.ndarray]:
        await batcher.start()
        backend.fail_next = 1
        first = await asyncio.gather(batcher.submit([[1], [2]]), return_exceptions=True)
        second = await batcher.submit([[3, 4]])
        await batcher.stop()
        return first[0], second

    failed, ok = run(main())
    assert isinstance(failed, BackendFailure) and "/secret" not in str(failed)
    assert isinstance(failed.__cause__, RuntimeError)
    np.testing.assert_array_equal(ok.logits, expected([[3, 4]]))


def test_cancelled_caller_rows_are_skipped() -> None:
    batcher, backend = make(max_batch=2)

    async def main() -> Encoded:
        await batcher.start()
        backend.gate.clear()
        backend.entered.clear()
        running = asyncio.create_task(batcher.submit([[1], [1]]))
        await asyncio.get_running_loop().run_in_executor(None, backend.entered.wait, 10)
        gone = asyncio.create_task(batcher.submit([[5]] * 6))
        kept = asyncio.create_task(batcher.submit([[9]]))
        await asyncio.sleep(0)
        gone.cancel()
        backend.batches.clear()
        backend.gate.set()
        await running
        out = await kept
        await batcher.stop()
        return out

    np.testing.assert_array_equal(run(main()).logits, expected([[9]]))
    assert sum(rows for rows, _ in backend.batches) == 2 + 1  # the 6 cancelled rows never ran


def test_stop_with_drain_finishes_queued_work() -> None:
    batcher, _ = make(max_batch=2, delay_ms=1000.0)

    async def main() -> list[Encoded]:
        await batcher.start()
        calls = [asyncio.create_task(batcher.submit([[i]])) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.stop(drain=True)  # does not wait out the 1 s delay
        with pytest.raises(ShuttingDown):
            await batcher.submit([[1]])
        return list(await asyncio.gather(*calls))

    for i, out in enumerate(run(main())):
        np.testing.assert_array_equal(out.logits, expected([[i]]))


def test_stop_without_drain_fails_queued_work() -> None:
    batcher, backend = make(max_batch=1)

    async def main() -> list[BaseException | Encoded]:
        await batcher.start()
        backend.gate.clear()
        backend.entered.clear()
        calls = [asyncio.create_task(batcher.submit([[i]])) for i in range(3)]
        await asyncio.get_running_loop().run_in_executor(None, backend.entered.wait, 10)
        stopping = asyncio.create_task(batcher.stop(drain=False))
        await asyncio.sleep(0.01)
        backend.gate.set()
        await stopping
        return list(await asyncio.gather(*calls, return_exceptions=True))

    running, *queued = run(main())
    np.testing.assert_array_equal(running.logits, expected([[0]]))  # the batch in flight completes
    assert all(isinstance(r, ShuttingDown) for r in queued)


def test_texts_are_tokenized_once_per_batch_in_the_worker_thread() -> None:
    tokens = Tokens(limit=3)
    batcher, backend = make(max_batch=8, tokenize=tokens)
    batcher.max_padding = 1.0
    requests: list[list[Any]] = [["1 2"], ["4 4 4 4 4", [5, 5]], ["6"], [[9] * 4]]

    async def main() -> list[Encoded]:
        await batcher.start()
        backend.batches.clear()
        out = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.stop()
        return list(out)

    first, second, third, fourth = run(main())
    assert [texts for texts, _ in tokens.calls] == [["1 2", "4 4 4 4 4", "6"]]  # one call
    assert tokens.calls[0][1].startswith("encoder-sum")  # not the event loop
    np.testing.assert_array_equal(first.logits, expected([[1, 2]]))
    np.testing.assert_array_equal(second.logits, expected([[4, 4, 4], [5, 5]]))
    assert second.tokens == [3, 2] and second.truncated == [True, False]
    assert third.tokens == [1] and fourth.tokens == [4] and fourth.truncated == [False]


def test_a_full_queue_refuses_before_tokenizing() -> None:
    tokens = Tokens()
    batcher, backend = make(max_batch=1, max_queue=1, tokenize=tokens)

    async def main() -> None:
        await batcher.start()
        backend.gate.clear()
        backend.entered.clear()
        running = asyncio.create_task(batcher.submit(["1"]))
        await asyncio.get_running_loop().run_in_executor(None, backend.entered.wait, 10)
        waiting = asyncio.create_task(batcher.submit(["2"]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(["3"])
        backend.gate.set()
        await asyncio.gather(running, waiting)
        await batcher.stop()

    run(main())
    assert sorted(t for texts, _ in tokens.calls for t in texts) == ["1", "2"]


def test_a_tokenizer_failure_fails_only_that_batch() -> None:
    tokens = Tokens()
    batcher, _ = make(max_batch=2, delay_ms=0.0, tokenize=tokens)

    async def main() -> tuple[BaseException | Encoded, Encoded]:
        await batcher.start()
        tokens.fail_next = 1
        first = await asyncio.gather(batcher.submit(["1", "2"]), return_exceptions=True)
        second = await batcher.submit(["3 4"])
        await batcher.stop()
        return first[0], second

    failed, ok = run(main())
    assert isinstance(failed, BackendFailure) and "exploded" not in str(failed)
    np.testing.assert_array_equal(ok.logits, expected([[3, 4]]))


def test_a_text_the_tokenizer_fails_on_fails_its_request_not_its_batch_mates() -> None:
    tokens = Tokens()
    tokens.poison = "bad"
    batcher, backend = make(max_batch=8, tokenize=tokens)

    async def main() -> list[BaseException | Encoded]:
        await batcher.start()
        backend.batches.clear()
        out = await asyncio.gather(
            batcher.submit(["1 2"]), batcher.submit(["3", "bad"]), batcher.submit(["5 5 5"]),
            return_exceptions=True,
        )  # fmt: skip
        await batcher.stop()
        return list(out)

    first, poisoned, third = run(main())
    assert tokens.calls[0][0] == ["1 2", "3", "bad", "5 5 5"]  # one batch
    assert isinstance(poisoned, BackendFailure)
    assert isinstance(first, Encoded) and isinstance(third, Encoded)
    np.testing.assert_array_equal(first.logits, expected([[1, 2]]))
    np.testing.assert_array_equal(third.logits, expected([[5, 5, 5]]))

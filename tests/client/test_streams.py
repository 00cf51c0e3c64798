"""Streaming calls: chunk mapping, errors while iterating, and cancellation of abandoned streams."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from headrace.client import (
    AsyncClient,
    ClassifyInput,
    Client,
    DeadlineExceeded,
    FinishReason,
    GenerateChunk,
    InvalidArgument,
    Usage,
)

from tests.client.conftest import ServerThread

WAIT = 15.0  # seconds to wait for the server to notice a cancellation (a bound, not a timing)


def assert_cancelled(server: ServerThread, request_id: str) -> None:
    assert server.record.event(server.record.cancelled, request_id).wait(WAIT), (
        f"the server never saw {request_id} cancelled"
    )
    assert not server.record.event(server.record.finished, request_id).is_set()


def test_stream_chunks(server: ServerThread) -> None:
    with Client(server.address) as client:
        chunks = list(client.stream("hello", request_id="s-full"))
    assert "".join(c.text for c in chunks) == "hello"
    assert all(isinstance(c, GenerateChunk) for c in chunks)
    assert (chunks[0].model, chunks[0].model_version) == ("gen", "1")
    assert all(c.request_id == "s-full" for c in chunks)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * 4
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason is FinishReason.EOS
    assert chunks[-1].usage == Usage(prompt_tokens=3, completion_tokens=5)
    assert [c.token_ids for c in chunks] == [(i,) for i in range(5)]


def test_break_after_first_chunk_cancels_the_call(server: ServerThread) -> None:
    with Client(server.address) as client:
        for chunk in client.stream("p", model="endless", request_id="s-break"):
            assert chunk.text == "p"
            break
        assert_cancelled(server, "s-break")
        # The channel is still fine for other calls.
        assert client.classify("x").model == "tiny"


def test_close_and_with_block_cancel(server: ServerThread) -> None:
    with Client(server.address) as client:
        stream = client.stream("p", model="endless", request_id="s-close")
        next(stream)
        stream.close()
        assert stream.cancelled
        assert list(stream) == []  # ends quietly after close
        assert_cancelled(server, "s-close")

        with client.stream("p", model="endless", request_id="s-with") as stream:
            next(stream)
        assert_cancelled(server, "s-with")


def test_close_from_another_thread_unblocks_the_reader(server: ServerThread) -> None:
    with Client(server.address) as client:
        stream = client.stream("p", model="endless", request_id="s-thread")
        got: list[GenerateChunk] = []
        reader = threading.Thread(target=lambda: got.extend(stream))
        reader.start()
        deadline = time.monotonic() + WAIT
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        stream.close()
        reader.join(WAIT)
        assert not reader.is_alive()
        assert stream.cancelled
        assert 0 < len(got) < 500
        assert_cancelled(server, "s-thread")


def test_finished_stream_is_not_cancelled(server: ServerThread) -> None:
    with Client(server.address) as client:
        stream = client.stream("abc", request_id="s-done")
        assert len(list(stream)) == 3
        stream.close()
        assert not stream.cancelled
    assert server.record.event(server.record.finished, "s-done").wait(WAIT)
    assert not server.record.event(server.record.cancelled, "s-done").is_set()


def test_error_mid_stream_surfaces_while_iterating(server: ServerThread) -> None:
    with Client(server.address) as client:
        stream = client.stream("hello", model="fail-mid", request_id="s-err")
        assert next(stream).text == "h"
        assert next(stream).text == "e"
        with pytest.raises(InvalidArgument) as info:
            next(stream)
    assert info.value.field == "stop[0]" and info.value.request_id == "s-err"


def test_stream_deadline(server: ServerThread) -> None:
    with Client(server.address) as client:
        with pytest.raises(DeadlineExceeded):
            for _ in client.stream("p", model="endless", request_id="s-deadline", timeout=0.2):
                pass
    assert_cancelled(server, "s-deadline")


def test_classify_stream_in_order_with_defaults(server: ServerThread) -> None:
    items = [
        ClassifyInput(["a", "b"], request_id="cs-1", top_k=1),
        "single",
        ["x", "y", "z"],
        ClassifyInput("override", model="other", version="9"),
    ]
    with Client(server.address) as client:
        results = list(client.classify_stream(items, model="tiny", top_k=2))
    assert [len(r) for r in results] == [2, 1, 3, 1]
    assert results[0].request_id == "cs-1"
    assert [len(c.labels) for c in results[0].results] == [1, 1]
    assert [len(c.labels) for c in results[1].results] == [2]
    assert (results[3].model, results[3].model_version) == ("other", "9")
    sent = server.record.requests[-4:]
    assert [r.model for r in sent] == ["tiny", "tiny", "tiny", "other"]
    assert [list(r.texts) for r in sent] == [["a", "b"], ["single"], ["x", "y", "z"], ["override"]]


def test_classify_stream_reads_requests_lazily(server: ServerThread) -> None:
    fed: list[int] = []

    def requests() -> Iterator[str]:
        for i in range(3):
            fed.append(i)
            yield f"text {i}"

    with Client(server.address) as client:
        stream = client.classify_stream(requests())
        assert len(list(stream)) == 3
    assert fed == [0, 1, 2]


def test_classify_stream_error_ends_the_stream(server: ServerThread) -> None:
    items = [ClassifyInput("ok"), ClassifyInput(["a", ""], model="bad")]
    with Client(server.address) as client:
        stream = client.classify_stream(items)
        assert next(stream).results[0].top.name == "positive"
        with pytest.raises(InvalidArgument) as info:
            next(stream)
    assert info.value.field == "texts[1]"


def test_classify_stream_reraises_the_callers_own_error(server: ServerThread) -> None:
    def requests() -> Iterator[str]:
        yield "fine"
        raise LookupError("no more work")

    with Client(server.address) as client:
        with pytest.raises(LookupError, match="no more work"):
            list(client.classify_stream(requests()))
        with pytest.raises(TypeError):
            list(client.classify_stream([["ok", 3]]))  # type: ignore[list-item]


def test_async_stream_chunks_and_break_cancels(server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncClient(server.address) as client:
            chunks = [c async for c in client.stream("hey", request_id="as-full")]
            assert "".join(c.text for c in chunks) == "hey"
            assert chunks[-1].finish_reason is FinishReason.EOS

            async for chunk in client.stream("p", model="endless", request_id="as-break"):
                assert chunk.text == "p"
                break
            await asyncio.to_thread(assert_cancelled, server, "as-break")

    asyncio.run(main())


def test_async_aclose_context_and_task_cancel(server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncClient(server.address) as client:
            stream = client.stream("p", model="endless", request_id="as-aclose")
            await stream.__anext__()
            await stream.aclose()
            assert stream.cancelled
            assert [c async for c in stream] == []
            await asyncio.to_thread(assert_cancelled, server, "as-aclose")

            async with client.stream("p", model="endless", request_id="as-with") as s:
                await s.__anext__()
            await asyncio.to_thread(assert_cancelled, server, "as-with")

            started = asyncio.Event()

            async def consume() -> None:
                async for _ in client.stream("p", model="endless", request_id="as-task"):
                    started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), WAIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(assert_cancelled, server, "as-task")

    asyncio.run(main())


def test_async_stream_errors(server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncClient(server.address) as client:
            with pytest.raises(InvalidArgument) as info:
                async for _ in client.stream("hello", model="fail-mid"):
                    pass
            assert info.value.field == "stop[0]"
            with pytest.raises(DeadlineExceeded):
                async for _ in client.stream("p", model="endless", timeout=0.2):
                    pass

    asyncio.run(main())


def test_async_classify_stream(server: ServerThread) -> None:
    async def requests() -> AsyncIterator[ClassifyInput | str]:
        yield ClassifyInput(["a", "b"], request_id="acs-1")
        await asyncio.sleep(0.01)
        yield "c"

    async def failing() -> AsyncIterator[str]:
        yield "fine"
        raise LookupError("no more work")

    async def main() -> None:
        async with AsyncClient(server.address) as client:
            results = [r async for r in client.classify_stream(requests(), top_k=1)]
            assert [len(r) for r in results] == [2, 1]
            assert results[0].request_id == "acs-1"
            assert len(results[1].results[0].labels) == 1
            plain = [r async for r in client.classify_stream(["x", ["y", "z"]])]
            assert [len(r) for r in plain] == [1, 2]
            with pytest.raises(InvalidArgument):
                async for _ in client.classify_stream([ClassifyInput("a", model="bad")]):
                    pass
            with pytest.raises(LookupError):
                async for _ in client.classify_stream(failing()):
                    pass

    asyncio.run(main())

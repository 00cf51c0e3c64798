"""The engine IPC's frames (server/engine_ipc/wire.py): every kind survives the trip over a
real Unix socket, field by field, and frames of one loop pass leave in one write."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from headrace.server.engine_ipc import wire
from headrace.server.errors import ModelNotFound, ModelUnavailable
from headrace.server.types import (
    BackendFailure,
    FinishReason,
    GenerateParams,
    InvalidArgument,
    QueueFull,
    SamplingParams,
    ShuttingDown,
    StreamInterval,
    TokenEvent,
)


class CountingWriter:
    """The real StreamWriter, counting the writes the Sender makes."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.writes = 0

    def is_closing(self) -> bool:
        return self.writer.is_closing()

    def writelines(self, data: list[bytes]) -> None:
        self.writes += 1
        self.writer.writelines(data)


async def through_socket(
    tmp_path: Path, frames: list[bytes]
) -> tuple[list[tuple[int, int, bytes]], int]:
    """Send `frames` from one loop pass; -> the frames read, and the writes it took."""
    got: list[tuple[int, int, bytes]] = []
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while len(data) < sum(len(f) for f in frames):
            data += await reader.read(1 << 20)
        feed = asyncio.StreamReader()
        feed.feed_data(data)
        feed.feed_eof()
        for _ in frames:
            kind, call_id, body = await wire.read_frame(feed)
            got.append((kind, call_id, bytes(body)))
        done.set()

    path = tmp_path / "s.sock"
    server = await asyncio.start_unix_server(serve, path=str(path))
    _, writer = await asyncio.open_unix_connection(str(path))
    counting = CountingWriter(writer)
    sender = wire.Sender(counting)  # type: ignore[arg-type]
    for f in frames:
        sender.send(f)
    await asyncio.wait_for(done.wait(), 10)
    writer.close()
    server.close()
    return got, counting.writes


def test_every_frame_round_trips(tmp_path: Path) -> None:
    rows = [[101, 7, 102], [], [5] * 70]
    params = GenerateParams(
        prompt_ids=(1, 2, 3),
        max_new_tokens=17,
        sampling=SamplingParams(
            temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=-5, ignore_eos=True
        ),
        stop=("\n\n", "é終"),
        stream=StreamInterval(4, 25),
    )
    logits = np.arange(6, dtype=np.float32).reshape(3, 2) - 2.5
    event = TokenEvent("tëxt", (9, 10), FinishReason.STOP, 3, 12, (100, 250))
    frames = [
        wire.classify_frame(1, "clf", "2", rows),
        wire.generate_frame(2, "gen", "", params),
        wire.generate_frame(3, "gen", "1", GenerateParams((4,), 1)),
        wire.scores_frame(4, logits, [3, 0, 70]),
        wire.tokens_frame(5, event),
        wire.tokens_frame(6, TokenEvent("", (), None)),
        wire.frame(wire.CANCEL, 7),
    ]
    got, writes = asyncio.run(through_socket(tmp_path, frames))
    assert writes == 1  # one write for the loop pass
    assert [(k, i) for k, i, _ in got] == [
        (wire.CLASSIFY, 1), (wire.GENERATE, 2), (wire.GENERATE, 3), (wire.SCORES, 4),
        (wire.TOKENS, 5), (wire.TOKENS, 6), (wire.CANCEL, 7),
    ]  # fmt: skip
    bodies = [memoryview(b) for _, _, b in got]
    assert wire.parse_classify(bodies[0]) == ("clf", "2", rows)
    assert wire.parse_generate(bodies[1]) == ("gen", "", params)
    assert wire.parse_generate(bodies[2])[2].sampling.seed is None  # unset stays unset
    scores, tokens = wire.parse_scores(bodies[3])
    assert np.array_equal(scores, logits) and tokens == [3, 0, 70]
    assert wire.parse_tokens(bodies[4]) == event
    assert wire.parse_tokens(bodies[5]) == TokenEvent("", (), None)


@pytest.mark.parametrize(
    "error",
    [
        QueueFull("model 'x' has 8 requests waiting; retry later", retry_after_s=0.25),
        ShuttingDown("the engine is stopping"),
        InvalidArgument("texts[2]", "texts[2] is empty"),
        ModelNotFound("model 'nope' is not served"),
        ModelUnavailable("model 'x' has no ready version (version 1 is loading)"),
        BackendFailure("the model failed while running this batch"),
    ],
)
def test_errors_keep_their_kind_and_message(error: Exception) -> None:
    body = memoryview(wire.error_frame(9, error)[wire.HEADER.size :])
    back = wire.parse_error(body)
    assert type(back) is type(error) and str(back) == str(error)
    if isinstance(error, QueueFull):
        assert isinstance(back, QueueFull) and back.retry_after_s == pytest.approx(0.25)
    if isinstance(error, InvalidArgument):
        assert isinstance(back, InvalidArgument) and back.field == "texts[2]"


def test_an_unexpected_error_crosses_without_its_text() -> None:
    body = memoryview(wire.error_frame(9, RuntimeError("/secret/path exploded"))[wire.HEADER.size :])
    back = wire.parse_error(body)
    assert isinstance(back, BackendFailure) and "secret" not in str(back)

"""The frames between front ends and the engine: a fixed header, then a fixed-layout body.

    header  <I B Q   body length, kind, call id (chosen by the front end, per connection)

Front end -> engine:

    CLASSIFY  model, version (str16 each), n rows (u32), n lengths (u32 each), the ids (i32)
    GENERATE  model, version, GEN_PARAMS, n prompt ids (u32), n stops (u16), the ids (i32),
              the stop strings (str16 each)
    CANCEL    empty: the call's sequence leaves the engine at its next step
    PING      empty: answered by PONG (the IPC's own round trip)

Engine -> front end:

    CATALOG   JSON: served versions and every version's state (only when they change)
    SCORES    rows, labels (u32 each), logits (f32, rows x labels), tokens per row (i32)
    TOKENS    TOKENS_HEAD, the ids (i32), µs since queued per token (u32), the text (UTF-8)
    ERROR     code (u8), retry after (f32), field (str16), message (UTF-8)
    PONG      empty

Nothing is pickled; a token costs 8 bytes plus its text. Every frame written in one pass
of a side's event loop leaves in one write (`Sender`): a decode step that feeds 64
sequences of one front end is one write, not 64.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
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

HEADER = struct.Struct("<IBQ")
# max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, has seed, ignore_eos,
# stream tokens, stream ms
GEN_PARAMS = struct.Struct("<IddidqBBII")
# finish (FINISH_CODES), prompt tokens, completion tokens, n tokens, text bytes
TOKENS_HEAD = struct.Struct("<BIIII")
SCORES_HEAD = struct.Struct("<II")
ERROR_HEAD = struct.Struct("<Bf")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
MAX_FRAME = 256 * 1024 * 1024

CLASSIFY, GENERATE, CANCEL, PING = 1, 2, 3, 4
CATALOG, SCORES, TOKENS, ERROR, PONG = 10, 11, 12, 13, 14

FINISH_CODES: dict[FinishReason | None, int] = {None: 0}
FINISH_CODES.update({reason: i + 1 for i, reason in enumerate(FinishReason)})
FINISH_FROM_CODE = {code: reason for reason, code in FINISH_CODES.items()}

E_QUEUE_FULL, E_SHUTTING_DOWN, E_BACKEND, E_INVALID, E_NOT_FOUND, E_UNAVAILABLE = range(1, 7)


def frame(kind: int, call_id: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return HEADER.pack(len(body), kind, call_id) + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, memoryview]:
    """(kind, call id, body); raises asyncio.IncompleteReadError at the end of the stream."""
    length, kind, call_id = HEADER.unpack(await reader.readexactly(HEADER.size))
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes")
    body = await reader.readexactly(length) if length else b""
    return kind, call_id, memoryview(body)


def _str16(text: str) -> bytes:
    raw = text.encode()
    return U16.pack(len(raw)) + raw


def _read_str16(body: memoryview, at: int) -> tuple[str, int]:
    (n,) = U16.unpack_from(body, at)
    at += U16.size
    return bytes(body[at : at + n]).decode(), at + n


# -- requests ---------------------------------------------------------------------------


def classify_frame(call_id: int, model: str, version: str, rows: Sequence[Sequence[int]]) -> bytes:
    lengths = np.fromiter((len(r) for r in rows), dtype="<u4", count=len(rows))
    ids = np.fromiter((t for r in rows for t in r), dtype="<i4", count=int(lengths.sum()))
    return frame(
        CLASSIFY, call_id, _str16(model), _str16(version), U32.pack(len(rows)),
        lengths.tobytes(), ids.tobytes(),
    )  # fmt: skip


def parse_classify(body: memoryview) -> tuple[str, str, list[list[int]]]:
    model, at = _read_str16(body, 0)
    version, at = _read_str16(body, at)
    (n,) = U32.unpack_from(body, at)
    at += U32.size
    lengths = np.frombuffer(body, dtype="<u4", count=n, offset=at).tolist()
    at += 4 * n
    ids = np.frombuffer(body, dtype="<i4", count=sum(lengths), offset=at).tolist()
    rows, start = [], 0
    for length in lengths:
        rows.append(ids[start : start + length])
        start += length
    return model, version, rows


def generate_frame(call_id: int, model: str, version: str, params: GenerateParams) -> bytes:
    s = params.sampling
    head = GEN_PARAMS.pack(
        params.max_new_tokens, s.temperature, s.top_p, s.top_k, s.repetition_penalty,
        s.seed if s.seed is not None else 0, s.seed is not None, s.ignore_eos,
        params.stream.tokens, params.stream.ms,
    )  # fmt: skip
    ids = np.asarray(params.prompt_ids, dtype="<i4").tobytes()
    stops = b"".join(_str16(s) for s in params.stop)
    return frame(
        GENERATE, call_id, _str16(model), _str16(version), head,
        U32.pack(len(params.prompt_ids)), U16.pack(len(params.stop)), ids, stops,
    )  # fmt: skip


def parse_generate(body: memoryview) -> tuple[str, str, GenerateParams]:
    model, at = _read_str16(body, 0)
    version, at = _read_str16(body, at)
    (max_new, temp, top_p, top_k, rep, seed, has_seed, ignore_eos, s_tokens, s_ms) = (
        GEN_PARAMS.unpack_from(body, at)
    )
    at += GEN_PARAMS.size
    (n,) = U32.unpack_from(body, at)
    (n_stop,) = U16.unpack_from(body, at + U32.size)
    at += U32.size + U16.size
    ids = tuple(np.frombuffer(body, dtype="<i4", count=n, offset=at).tolist())
    at += 4 * n
    stops = []
    for _ in range(n_stop):
        stop, at = _read_str16(body, at)
        stops.append(stop)
    sampling = SamplingParams(
        temperature=temp, top_p=top_p, top_k=top_k, repetition_penalty=rep,
        seed=seed if has_seed else None, ignore_eos=bool(ignore_eos),
    )  # fmt: skip
    params = GenerateParams(ids, max_new, sampling, tuple(stops), StreamInterval(s_tokens, s_ms))
    return model, version, params


# -- results ----------------------------------------------------------------------------


def scores_frame(call_id: int, logits: np.ndarray, tokens: Sequence[int]) -> bytes:
    rows, labels = logits.shape
    return frame(
        SCORES, call_id, SCORES_HEAD.pack(rows, labels),
        np.ascontiguousarray(logits, dtype="<f4").tobytes(),
        np.asarray(tokens, dtype="<i4").tobytes(),
    )  # fmt: skip


def parse_scores(body: memoryview) -> tuple[np.ndarray, list[int]]:
    rows, labels = SCORES_HEAD.unpack_from(body, 0)
    at = SCORES_HEAD.size
    logits = np.frombuffer(body, dtype="<f4", count=rows * labels, offset=at)
    tokens = np.frombuffer(body, dtype="<i4", count=rows, offset=at + 4 * rows * labels)
    return logits.reshape(rows, labels), tokens.tolist()


def tokens_frame(call_id: int, event: TokenEvent) -> bytes:
    text = event.text.encode()
    n = len(event.token_ids)
    times = event.token_times_us if len(event.token_times_us) == n else (0,) * n
    body = b"".join((
        TOKENS_HEAD.pack(FINISH_CODES[event.finish_reason], event.prompt_tokens,
                         event.completion_tokens, n, len(text)),
        struct.pack(f"<{n}i{n}I", *event.token_ids, *times),  # a step's few: no numpy
        text,
    ))  # fmt: skip
    return HEADER.pack(len(body), TOKENS, call_id) + body


def parse_tokens(body: memoryview) -> TokenEvent:
    finish, prompt, completion, n, n_text = TOKENS_HEAD.unpack_from(body, 0)
    at = TOKENS_HEAD.size
    values = struct.unpack_from(f"<{n}i{n}I", body, at)
    at += 8 * n
    text = bytes(body[at : at + n_text]).decode()
    return TokenEvent(
        text, values[:n], FINISH_FROM_CODE[finish], prompt, completion, values[n:]
    )  # fmt: skip


def error_frame(call_id: int, exc: BaseException) -> bytes:
    retry, field = 0.0, ""
    if isinstance(exc, QueueFull):
        code, retry = E_QUEUE_FULL, exc.retry_after_s
    elif isinstance(exc, ShuttingDown):
        code = E_SHUTTING_DOWN
    elif isinstance(exc, InvalidArgument):
        code, field = E_INVALID, exc.field
    elif isinstance(exc, ModelNotFound):
        code = E_NOT_FOUND
    elif isinstance(exc, ModelUnavailable):
        code = E_UNAVAILABLE
    else:
        code = E_BACKEND
    message = str(exc) if code != E_BACKEND or isinstance(exc, BackendFailure) else ""
    return frame(ERROR, call_id, ERROR_HEAD.pack(code, retry), _str16(field), message.encode())


def parse_error(body: memoryview) -> Exception:
    code, retry = ERROR_HEAD.unpack_from(body, 0)
    field, at = _read_str16(body, ERROR_HEAD.size)
    message = bytes(body[at:]).decode()
    if code == E_QUEUE_FULL:
        return QueueFull(message, retry_after_s=retry)
    if code == E_SHUTTING_DOWN:
        return ShuttingDown(message)
    if code == E_INVALID:
        return InvalidArgument(field, message)
    if code == E_NOT_FOUND:
        return ModelNotFound(message)
    if code == E_UNAVAILABLE:
        return ModelUnavailable(message)
    return BackendFailure(message or "the model failed while running this request")


def catalog_frame(catalog: dict[str, Any]) -> bytes:
    return frame(CATALOG, 0, json.dumps(catalog).encode())


class Sender:
    """Frames written in one pass of the event loop leave in one write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def send(self, data: bytes) -> None:
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if not self.writer.is_closing():
            self.writer.writelines(out)

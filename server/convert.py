"""The gRPC front's proto messages <-> plain types (server/types.py).

The only place where the `headrace.v1` service turns a message into the typed
call every front builds (ClassifyCall, GenerateCall) and results back into
messages. Nothing here checks a value against a model's limits: the model does,
in server/calls.py, with canonical field names that are this front's own (the
proto's field paths), so BadRequest names them as they are. What is proto's alone
is mapped here: a zero value means "the default" (top_p 0 and repetition_penalty 0
turn them off, an unset `seed` is a random one).
"""

from __future__ import annotations

from collections.abc import Sequence

from headrace.server.model_state import ModelState
from headrace.server.repository import ModelEntry
from headrace.server.types import (
    MAX_STREAM_INTERVAL,
    MAX_STREAM_INTERVAL_MS,
    ClassifyCall,
    ClassifyItem,
    FinishReason,
    GenerateCall,
    InvalidArgument,
    SamplingParams,
    Task,
    TokenEvent,
)
from headrace.v1 import inference_pb2 as pb

FINISH_TO_PB = {
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.STOP: pb.STOP,
    FinishReason.EOS: pb.EOS,
}
TASK_TO_PB = {Task.CLASSIFY: pb.TASK_CLASSIFY, Task.GENERATE: pb.TASK_GENERATE}
TASK_FROM_PB = {pb.TASK_CLASSIFY: Task.CLASSIFY, pb.TASK_GENERATE: Task.GENERATE}
STATE_TO_PB = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
    ModelState.RETIRING: pb.MODEL_STATE_RETIRING,
}


# -- classify ---------------------------------------------------------------------------------


def classify_call(request: pb.ClassifyRequest, request_id: str) -> ClassifyCall:
    return ClassifyCall(
        texts=tuple(request.texts),
        model=request.model,
        version=request.model_version,
        top_k=int(request.top_k),
        reject_overlong=bool(request.reject_overlong),
        request_id=request_id,
    )


def classify_response(
    items: Sequence[ClassifyItem], *, model: str, version: str, request_id: str
) -> pb.ClassifyResponse:
    # `add` builds each message in place: passing lists of messages to a constructor
    # builds them and then copies them in (twice the time, measured).
    response = pb.ClassifyResponse(model=model, model_version=version, request_id=request_id)
    tokens = 0
    for item in items:
        result = response.results.add(truncated=item.truncated, input_tokens=item.input_tokens)
        for name, score in item.labels:
            result.labels.add(name=name, score=score)
        tokens += item.input_tokens
    response.usage.prompt_tokens = tokens
    return response


# -- generate ---------------------------------------------------------------------------------


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """A SamplingParams message in SamplingParams' terms (zero values mean "the default")."""
    return SamplingParams(
        temperature=float(msg.temperature),
        top_p=1.0 if msg.top_p == 0.0 else float(msg.top_p),
        top_k=int(msg.top_k),
        repetition_penalty=1.0 if msg.repetition_penalty == 0.0 else float(msg.repetition_penalty),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        ignore_eos=bool(msg.ignore_eos),
    )


def stream_interval(request: pb.GenerateRequest) -> tuple[int | None, int | None]:
    """(tokens, ms) per message; None where the request leaves the server's default.

    Raises InvalidArgument naming `stream_interval` or `stream_interval_ms` when out of range.
    """
    tokens = int(request.stream_interval)
    if tokens > MAX_STREAM_INTERVAL:
        raise InvalidArgument(
            "stream_interval",
            f"stream_interval must be in [0, {MAX_STREAM_INTERVAL}] tokens "
            "(0 means the server's default)",
        )
    ms = int(request.stream_interval_ms) if request.HasField("stream_interval_ms") else None
    if ms is not None and ms > MAX_STREAM_INTERVAL_MS:
        raise InvalidArgument(
            "stream_interval_ms",
            f"stream_interval_ms must be in [0, {MAX_STREAM_INTERVAL_MS}] (0 turns it off)",
        )
    return tokens or None, ms


def generate_call(request: pb.GenerateRequest, request_id: str) -> GenerateCall:
    tokens, ms = stream_interval(request)
    return GenerateCall(
        prompt=request.prompt,
        model=request.model,
        version=request.model_version,
        max_new_tokens=int(request.max_new_tokens),
        sampling=sampling_params(request.sampling),
        stop=tuple(request.stop),
        reject_overlong=bool(request.reject_overlong),
        request_id=request_id,
        stream_interval=tokens,
        stream_interval_ms=ms,
    )


def generate_chunk(event: TokenEvent, request_id: str) -> pb.GenerateChunk:
    chunk = pb.GenerateChunk(
        text=event.text,
        token_ids=event.token_ids,
        request_id=request_id,
        token_times_us=event.token_times_us,
    )
    if event.finish_reason is not None:
        chunk.finish_reason = FINISH_TO_PB[event.finish_reason]
        chunk.usage.prompt_tokens = event.prompt_tokens
        chunk.usage.completion_tokens = event.completion_tokens
    return chunk


# -- list models -----------------------------------------------------------------------------


def model_info(entry: ModelEntry, profile: str) -> pb.ModelInfo:
    statuses = [
        pb.ModelVersionStatus(version=s.version, state=STATE_TO_PB[s.state], reason=s.reason)
        for s in entry.statuses
    ]
    task = TASK_TO_PB[entry.task] if entry.task is not None else pb.TASK_UNSPECIFIED
    if not entry.ready:  # nothing loaded: no backend, labels or limits to tell
        return pb.ModelInfo(
            name=entry.name,
            task=task,
            profile=profile,
            version_status=statuses,
            state=STATE_TO_PB[entry.state],
        )
    lim = entry.limits
    generate = entry.task is Task.GENERATE
    return pb.ModelInfo(
        name=entry.name,
        versions=list(entry.versions),
        task=task,
        labels=list(entry.labels),
        backend=entry.backend,
        profile=profile,
        limits=pb.ModelLimits(
            max_input_tokens=lim.max_input_tokens,
            max_new_tokens=lim.max_new_tokens if generate else 0,
            max_texts=0 if generate else lim.max_texts,
            max_stop_strings=lim.max_stop_strings if generate else 0,
            max_stop_length=lim.max_stop_length if generate else 0,
            max_batch=entry.max_batch,
        ),
        precision=entry.precision,
        device=entry.device,
        is_default=entry.is_default,
        version_status=statuses,
        state=STATE_TO_PB[entry.state],
    )

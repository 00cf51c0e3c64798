"""The one place where SDK dataclasses become Protobuf messages and back."""

from __future__ import annotations

from collections.abc import Sequence

from headrace.v1 import inference_pb2 as pb

from ._types import (
    Classification,
    ClassifyInput,
    ClassifyResult,
    FinishReason,
    GenerateChunk,
    GenerateResult,
    Label,
    ModelInfo,
    ModelLimits,
    Task,
    Usage,
)

_FINISH_FROM_PB: dict[int, FinishReason | None] = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.LENGTH: FinishReason.LENGTH,
    pb.STOP: FinishReason.STOP,
    pb.EOS: FinishReason.EOS,
}
_TASK_FROM_PB: dict[int, Task | None] = {
    pb.TASK_UNSPECIFIED: None,
    pb.TASK_CLASSIFY: Task.CLASSIFY,
    pb.TASK_GENERATE: Task.GENERATE,
}
_TASK_TO_PB: dict[Task, pb.Task.ValueType] = {
    Task.CLASSIFY: pb.TASK_CLASSIFY,
    Task.GENERATE: pb.TASK_GENERATE,
}


def _texts(texts: str | Sequence[str]) -> list[str]:
    # A bare string is one text, not a sequence of characters.
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for text in out:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
    return out


def classify_request(
    texts: str | Sequence[str],
    *,
    model: str,
    version: str,
    top_k: int,
    request_id: str | None,
    reject_overlong: bool,
) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        model=model,
        model_version=version,
        texts=_texts(texts),
        top_k=top_k,
        request_id=request_id or "",
        reject_overlong=reject_overlong,
    )


def classify_stream_request(
    item: ClassifyInput | str | Sequence[str],
    *,
    model: str,
    version: str,
    top_k: int,
    reject_overlong: bool,
) -> pb.ClassifyRequest:
    """One request of a classify stream; the keyword defaults fill fields the item left unset."""
    if isinstance(item, ClassifyInput):
        return classify_request(
            item.texts,
            model=item.model or model,
            version=item.version or version,
            top_k=item.top_k or top_k,
            request_id=item.request_id,
            reject_overlong=item.reject_overlong or reject_overlong,
        )
    return classify_request(
        item,
        model=model,
        version=version,
        top_k=top_k,
        request_id=None,
        reject_overlong=reject_overlong,
    )


def generate_request(
    prompt: str,
    *,
    model: str,
    version: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    seed: int | None,
    stop: str | Sequence[str],
    ignore_eos: bool = False,
    request_id: str | None,
    reject_overlong: bool,
    stream_interval: int = 0,
    stream_interval_ms: int | None = None,
) -> pb.GenerateRequest:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    sampling = pb.SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        ignore_eos=ignore_eos,
    )
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateRequest(
        model=model,
        model_version=version,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop=[stop] if isinstance(stop, str) else list(stop),
        request_id=request_id or "",
        reject_overlong=reject_overlong,
        stream_interval=stream_interval,
        stream_interval_ms=stream_interval_ms,
    )


def list_models_request(task: Task | str | None) -> pb.ListModelsRequest:
    if task is None:
        return pb.ListModelsRequest()
    return pb.ListModelsRequest(task=_TASK_TO_PB[Task(task)])


def usage(msg: pb.Usage) -> Usage:
    return Usage(prompt_tokens=msg.prompt_tokens, completion_tokens=msg.completion_tokens)


def finish_reason(value: int) -> FinishReason | None:
    # An enum value newer than this SDK reads as "unset" rather than failing the call.
    return _FINISH_FROM_PB.get(value)


def classify_result(msg: pb.ClassifyResponse) -> ClassifyResult:
    return ClassifyResult(
        model=msg.model,
        model_version=msg.model_version,
        results=tuple(
            Classification(
                labels=tuple(Label(label.name, label.score) for label in item.labels),
                truncated=item.truncated,
                input_tokens=item.input_tokens,
            )
            for item in msg.results
        ),
        request_id=msg.request_id,
        usage=usage(msg.usage),
    )


def generate_result(msg: pb.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        model=msg.model,
        model_version=msg.model_version,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=finish_reason(msg.finish_reason),
        usage=usage(msg.usage),
        request_id=msg.request_id,
        prompt_truncated=msg.prompt_truncated,
    )


def generate_chunk(msg: pb.GenerateChunk) -> GenerateChunk:
    return GenerateChunk(
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=finish_reason(msg.finish_reason),
        usage=usage(msg.usage) if msg.HasField("usage") else None,
        request_id=msg.request_id,
        model=msg.model,
        model_version=msg.model_version,
        prompt_truncated=msg.prompt_truncated,
        token_times_us=tuple(msg.token_times_us),
    )


def model_info(msg: pb.ModelInfo) -> ModelInfo:
    limits = msg.limits
    return ModelInfo(
        name=msg.name,
        versions=tuple(msg.versions),
        task=_TASK_FROM_PB.get(msg.task),
        labels=tuple(msg.labels),
        backend=msg.backend,
        profile=msg.profile,
        limits=ModelLimits(
            max_input_tokens=limits.max_input_tokens,
            max_new_tokens=limits.max_new_tokens,
            max_texts=limits.max_texts,
            max_stop_strings=limits.max_stop_strings,
            max_stop_length=limits.max_stop_length,
            max_batch=limits.max_batch,
        ),
        precision=msg.precision,
        device=msg.device,
        is_default=msg.is_default,
    )


def model_infos(msg: pb.ListModelsResponse) -> list[ModelInfo]:
    return [model_info(m) for m in msg.models]

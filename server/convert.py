"""Proto messages <-> plain types (server/types.py), with request validation.

The only place where the service turns a `headrace.v1` message into what the
engine takes and turns engine results back into messages. Validation errors
raise `InvalidField` naming the request field, as the BadRequest detail will.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from headrace.server.errors import InvalidField
from headrace.server.manifest import Limits
from headrace.server.repository import ModelEntry
from headrace.server.types import ClassifyItem, FinishReason, SamplingParams, Task, TokenEvent
from headrace.v1 import inference_pb2 as pb

MAX_TOP_K = 1_000_000  # bound for top_k when the model's vocabulary size is unknown

FINISH_TO_PB = {
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.STOP: pb.STOP,
    FinishReason.EOS: pb.EOS,
}
TASK_TO_PB = {Task.CLASSIFY: pb.TASK_CLASSIFY, Task.GENERATE: pb.TASK_GENERATE}
TASK_FROM_PB = {pb.TASK_CLASSIFY: Task.CLASSIFY, pb.TASK_GENERATE: Task.GENERATE}


# -- classify ---------------------------------------------------------------------------------


def classify_texts(request: pb.ClassifyRequest, limits: Limits) -> list[str]:
    texts = list(request.texts)
    if not texts:
        raise InvalidField("texts", "texts must hold at least one text")
    if len(texts) > limits.max_texts:
        raise InvalidField(
            "texts", f"at most {limits.max_texts} texts per request, got {len(texts)}"
        )
    for i, text in enumerate(texts):
        if not text:
            raise InvalidField(f"texts[{i}]", "texts must not be empty")
    return texts


def classify_response(
    items: Sequence[ClassifyItem], *, model: str, version: str, request_id: str
) -> pb.ClassifyResponse:
    results = [
        pb.Classification(
            labels=[pb.Label(name=n, score=s) for n, s in item.labels],
            truncated=item.truncated,
            input_tokens=item.input_tokens,
        )
        for item in items
    ]
    return pb.ClassifyResponse(
        model=model,
        model_version=version,
        results=results,
        request_id=request_id,
        usage=pb.Usage(prompt_tokens=sum(i.input_tokens for i in items)),
    )


# -- generate ---------------------------------------------------------------------------------


def sampling_params(msg: pb.SamplingParams, vocab_size: int | None) -> SamplingParams:
    """Validate and default a SamplingParams message (zero values mean "the default")."""
    t = msg.temperature
    if math.isnan(t) or not 0.0 <= t <= 100.0:
        raise InvalidField("sampling.temperature", "temperature must be in [0, 100] (0 is greedy)")
    p = msg.top_p
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise InvalidField("sampling.top_p", "top_p must be in [0, 1] (0 or 1 turns it off)")
    k_max = vocab_size if vocab_size else MAX_TOP_K
    if msg.top_k > k_max:
        raise InvalidField("sampling.top_k", f"top_k must be at most {k_max} (0 turns it off)")
    rp = msg.repetition_penalty
    if math.isnan(rp) or not 0.0 <= rp <= 10.0:
        raise InvalidField(
            "sampling.repetition_penalty",
            "repetition_penalty must be in [0, 10] (0 or 1 turns it off)",
        )
    return SamplingParams(
        temperature=float(t),
        top_p=1.0 if p == 0.0 else float(p),
        top_k=int(msg.top_k),
        repetition_penalty=1.0 if rp == 0.0 else float(rp),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        ignore_eos=bool(msg.ignore_eos),
    )


def generate_args(
    request: pb.GenerateRequest, limits: Limits, vocab_size: int | None
) -> dict[str, Any]:
    """Keyword arguments for GeneratorModel.prepare, validated against the model's limits."""
    if not request.prompt:
        raise InvalidField("prompt", "prompt must not be empty")
    if request.max_new_tokens > limits.max_new_tokens:
        raise InvalidField(
            "max_new_tokens",
            f"max_new_tokens must be at most {limits.max_new_tokens} (0 means the default)",
        )
    stop = list(request.stop)
    if len(stop) > limits.max_stop_strings:
        raise InvalidField("stop", f"at most {limits.max_stop_strings} stop strings")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidField(f"stop[{i}]", "stop strings must not be empty")
        if len(s) > limits.max_stop_length:
            raise InvalidField(
                f"stop[{i}]", f"stop strings must be at most {limits.max_stop_length} characters"
            )
    return {
        "prompt": request.prompt,
        "max_new_tokens": int(request.max_new_tokens),
        "sampling": sampling_params(request.sampling, vocab_size),
        "stop": tuple(stop),
        "reject_overlong": bool(request.reject_overlong),
    }


def generate_chunk(event: TokenEvent, request_id: str) -> pb.GenerateChunk:
    chunk = pb.GenerateChunk(text=event.text, token_ids=event.token_ids, request_id=request_id)
    if event.finish_reason is not None:
        chunk.finish_reason = FINISH_TO_PB[event.finish_reason]
        chunk.usage.prompt_tokens = event.prompt_tokens
        chunk.usage.completion_tokens = event.completion_tokens
    return chunk


# -- list models -----------------------------------------------------------------------------


def model_info(entry: ModelEntry, profile: str) -> pb.ModelInfo:
    lim = entry.limits
    generate = entry.task is Task.GENERATE
    return pb.ModelInfo(
        name=entry.name,
        versions=list(entry.versions),
        task=TASK_TO_PB[entry.task],
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
    )

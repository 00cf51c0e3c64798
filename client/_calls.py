"""Every call of the SDK, written once: its arguments, its docstring, what it sends.

Each function here is one public method of both clients. It checks and converts the
caller's arguments into a `Unary` or `Streaming` call (which RPC, the request, how to
read the answer) and sends nothing. `Client` and `AsyncClient` take these functions
as their methods (`classify = unary(_calls.classify)`) and add only how a call is
sent: blocking, or as a coroutine. ParamSpec carries each signature over unchanged,
so mypy and an editor see the very parameters written here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar

from . import _convert, _health
from ._channel import Metadata
from ._streams import ClassifyItem, RequestFeeder
from ._types import (
    ClassifyResult,
    GenerateChunk,
    GenerateResult,
    HealthStatus,
    ModelInfo,
    Task,
)

__all__ = [
    "Call",
    "Streaming",
    "Unary",
    "as_method",
    "classify",
    "classify_stream",
    "generate",
    "health",
    "models",
    "stream",
    "sync_requests",
]

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# The RPCs of headrace.v1.Inference, and grpc.health.v1.Health's Check.
Method = Literal["Classify", "ClassifyStream", "Generate", "GenerateStream", "ListModels", "Check"]


@dataclass(
    slots=True
)  # not frozen: a frozen __init__ costs ~3 us a call here, and nothing mutates it
class Call(Generic[T]):
    """One RPC as the caller asked for it, not yet sent."""

    method: Method
    # the request message (Check: its serialized bytes); ClassifyStream: the RequestFeeder
    request: Any
    convert: Callable[[Any], T]  # one response -> what the caller gets
    timeout: float | None  # None: the client's default deadline
    metadata: Metadata | None  # sent after the client's own
    request_id: str | None = None  # named in the error when the server names none


class Unary(Call[T]):
    """A call answered by one response: the client returns `convert(response)`."""

    __slots__ = ()


class Streaming(Call[T]):
    """A call answered by a stream of responses, each one given through `convert`."""

    __slots__ = ()


def as_method(spec: Callable[..., Any], sender: F, owner: str) -> F:
    """`sender`, named and documented as the call `spec` it sends, as a method of `owner`.

    help() and inspect.signature show the parameters of `spec` after `self`.
    """
    functools.update_wrapper(sender, spec, assigned=("__name__", "__doc__"))
    sender.__qualname__ = f"{owner}.{spec.__name__}"
    signature = inspect.signature(spec)
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    setattr(  # noqa: B010 - a function object, typed as F
        sender,
        "__signature__",
        signature.replace(
            parameters=[self, *signature.parameters.values()],
            return_annotation=inspect.Signature.empty,
        ),
    )
    return sender


# -- unary calls -------------------------------------------------------------------


def classify(
    texts: str | Sequence[str],
    *,
    model: str = "",
    version: str = "",
    top_k: int = 0,
    request_id: str | None = None,
    reject_overlong: bool = False,
    timeout: float | None = None,
    metadata: Metadata | None = None,
) -> Unary[ClassifyResult]:
    """Labels and scores for each text (a bare string is one text), best first.

    `model=""` is the server's default classifier; `version=""` its newest version;
    `top_k=0` returns every label. Retried on UNAVAILABLE by the retry policy.
    """
    request = _convert.classify_request(
        texts,
        model=model,
        version=version,
        top_k=top_k,
        request_id=request_id,
        reject_overlong=reject_overlong,
    )
    return Unary("Classify", request, _convert.classify_result, timeout, metadata, request_id)


def generate(
    prompt: str,
    *,
    model: str = "",
    version: str = "",
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    ignore_eos: bool = False,
    stop: str | Sequence[str] = (),
    request_id: str | None = None,
    reject_overlong: bool = False,
    stream_interval: int = 0,
    stream_interval_ms: int | None = None,
    timeout: float | None = None,
    metadata: Metadata | None = None,
) -> Unary[GenerateResult]:
    """The whole completion of `prompt` (greedy unless `temperature` > 0).

    `max_new_tokens=0` is the model's default; `seed` makes sampling repeatable;
    `ignore_eos` generates past the end-of-sequence token (fixed-length load tests).
    `stream()` only: `stream_interval` tokens per chunk (0: the server's default) and
    `stream_interval_ms`, at most one chunk per that many ms after the first (None: the
    server's default, 0: off).
    """
    request = _convert.generate_request(
        prompt,
        model=model,
        version=version,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        ignore_eos=ignore_eos,
        stop=stop,
        request_id=request_id,
        reject_overlong=reject_overlong,
        stream_interval=stream_interval,
        stream_interval_ms=stream_interval_ms,
    )
    return Unary("Generate", request, _convert.generate_result, timeout, metadata, request_id)


def models(
    task: Task | str | None = None,
    *,
    timeout: float | None = None,
    metadata: Metadata | None = None,
) -> Unary[list[ModelInfo]]:
    """The served models (all, or those of `task`: "classify" or "generate")."""
    request = _convert.list_models_request(task)
    return Unary("ListModels", request, _convert.model_infos, timeout, metadata)


def health(
    service: str = "",
    *,
    timeout: float | None = None,
    metadata: Metadata | None = None,
) -> Unary[HealthStatus]:
    """The serving status from grpc.health.v1 (`service=""`: the whole server).

    Raises NotFound for a service name the server does not know.
    """
    return Unary("Check", _health.check_request(service), _health.check_response, timeout, metadata)


# -- streaming calls ---------------------------------------------------------------


def _streamed(unary: Callable[P, Unary[GenerateResult]]) -> Callable[P, Streaming[GenerateChunk]]:
    # GenerateStream takes exactly what Generate takes: one signature for both.
    def stream(*args: P.args, **kwargs: P.kwargs) -> Streaming[GenerateChunk]:
        """The completion chunk by chunk, as it is produced.

        Breaking out of the loop (and dropping the stream), closing it (`close()`,
        `aclose()`), or leaving its `with` / `async with` block cancels the call, which
        stops generation on the server.
        """
        call = unary(*args, **kwargs)
        return Streaming(
            "GenerateStream",
            call.request,
            _convert.generate_chunk,
            call.timeout,
            call.metadata,
            call.request_id,
        )

    stream.__signature__ = inspect.signature(unary)  # type: ignore[attr-defined]
    return stream


stream = _streamed(generate)


def classify_stream(
    requests: Iterable[ClassifyItem] | AsyncIterable[ClassifyItem],
    *,
    model: str = "",
    version: str = "",
    top_k: int = 0,
    reject_overlong: bool = False,
    timeout: float | None = None,
    metadata: Metadata | None = None,
) -> Streaming[ClassifyResult]:
    """One ClassifyResult per request, in order, over one bidirectional call.

    Each request is a `ClassifyInput`, a text, or a list of texts; the keyword
    arguments fill what an item leaves unset. `requests` is read lazily, as the call
    needs them (`Client`: from a gRPC thread; `AsyncClient`: a sync or async
    iterable), so it may be a generator that waits for work. An error on one request
    ends the stream.
    """
    feeder = RequestFeeder(requests, model, version, top_k, reject_overlong)
    return Streaming("ClassifyStream", feeder, _convert.classify_result, timeout, metadata)


def sync_requests(
    spec: Callable[Concatenate[Iterable[ClassifyItem] | AsyncIterable[ClassifyItem], P], T],
) -> Callable[Concatenate[Iterable[ClassifyItem], P], T]:
    """`spec` typed for the blocking client, whose requests are a plain Iterable."""
    return spec

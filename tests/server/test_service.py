"""The gRPC front's pure parts: proto -> typed calls, the checks every front shares
(server/calls.py), and error -> status mapping.

The servicer itself runs over real sockets in tests/e2e/test_server.py.
"""

from __future__ import annotations

import math

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from headrace.server import calls, convert
from headrace.server.errors import (
    INTERNAL_MESSAGE,
    ModelNotFound,
    ServerDraining,
    rich_status,
    status_for,
)
from headrace.server.manifest import Limits
from headrace.server.rpc import grpc_status
from headrace.server.types import (
    BackendFailure,
    ClassifyCall,
    ClassifyItem,
    FinishReason,
    GenerateCall,
    InvalidArgument,
    QueueFull,
    SamplingParams,
    ShuttingDown,
    TokenEvent,
)
from headrace.v1 import inference_pb2 as pb

LIMITS = Limits(max_new_tokens=32, max_texts=4, max_stop_strings=2, max_stop_length=5)


def test_sampling_defaults_and_mapping() -> None:
    params = convert.sampling_params(pb.SamplingParams())
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (
        0.0, 1.0, 0, 1.0,
    )  # fmt: skip
    assert params.seed is None and params.greedy
    msg = pb.SamplingParams(temperature=0.7, top_p=0.9, top_k=100, repetition_penalty=1.2, seed=0)
    params = convert.sampling_params(msg)
    assert params.temperature == pytest.approx(0.7) and params.top_p == pytest.approx(0.9)
    assert (params.top_k, params.seed) == (100, 0)  # seed 0 is a seed, not "unset"
    calls.check_sampling(params, vocab_size=100)


def _generate(request: pb.GenerateRequest, vocab_size: int | None = 100) -> GenerateCall:
    call = convert.generate_call(request, "r")
    calls.check_generate(call, LIMITS, vocab_size)
    return call


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (pb.SamplingParams(temperature=math.nan), "sampling.temperature"),
        (pb.SamplingParams(temperature=math.inf), "sampling.temperature"),
        (pb.SamplingParams(temperature=100.5), "sampling.temperature"),
        (pb.SamplingParams(top_p=math.nan), "sampling.top_p"),
        (pb.SamplingParams(top_p=-0.01), "sampling.top_p"),
        (pb.SamplingParams(top_k=101), "sampling.top_k"),
        (pb.SamplingParams(repetition_penalty=-1), "sampling.repetition_penalty"),
        (pb.SamplingParams(repetition_penalty=math.nan), "sampling.repetition_penalty"),
    ],
)
def test_sampling_rejects(msg: pb.SamplingParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        _generate(pb.GenerateRequest(prompt="a", sampling=msg))
    assert info.value.field == field
    assert info.value.message.startswith(field + " must be")


def test_top_k_bound_without_vocab() -> None:
    assert _generate(pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(top_k=5000)), None)
    with pytest.raises(InvalidArgument):
        calls.check_sampling(SamplingParams(top_k=calls.MAX_TOP_K + 1), None)


@pytest.mark.parametrize(
    ("request_msg", "field"),
    [
        (pb.GenerateRequest(prompt=""), "prompt"),
        (pb.GenerateRequest(prompt="a", max_new_tokens=33), "max_new_tokens"),
        (pb.GenerateRequest(prompt="a", stop=["x", "y", "z"]), "stop"),
        (pb.GenerateRequest(prompt="a", stop=["x", ""]), "stop[1]"),
        (pb.GenerateRequest(prompt="a", stop=["123456"]), "stop[0]"),
    ],
)
def test_generate_rejects(request_msg: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        _generate(request_msg)
    assert info.value.field == field and info.value.message.startswith(field + " ")


def test_generate_call() -> None:
    msg = pb.GenerateRequest(
        model="m", model_version="2", prompt="hi", max_new_tokens=32, stop=["\n"],
        reject_overlong=True, sampling=pb.SamplingParams(top_p=0.0, repetition_penalty=0.0),
    )  # fmt: skip
    call = _generate(msg)
    assert (call.model, call.version, call.prompt, call.max_new_tokens) == ("m", "2", "hi", 32)
    assert call.stop == ("\n",) and call.reject_overlong is True and call.request_id == "r"
    assert (call.sampling.top_p, call.sampling.repetition_penalty) == (1.0, 1.0)  # 0: off


def test_classify_call_and_checks() -> None:
    call = convert.classify_call(pb.ClassifyRequest(texts=["a", "b"], top_k=1), "r")
    assert call == ClassifyCall(texts=("a", "b"), top_k=1, request_id="r")
    calls.check_classify(call, LIMITS)
    for texts, field in (([], "texts"), (["a"] * 5, "texts"), (["a", ""], "texts[1]")):
        with pytest.raises(InvalidArgument) as info:
            calls.check_classify(convert.classify_call(pb.ClassifyRequest(texts=texts), ""), LIMITS)
        assert info.value.field == field and info.value.message.startswith(field + " ")


def test_another_front_renames_fields_in_its_own_terms() -> None:
    names = {"max_new_tokens": "max_tokens", "sampling.temperature": "temperature",
             "texts": "text_input"}  # fmt: skip
    with pytest.raises(InvalidArgument) as info:
        calls.check_generate(GenerateCall(prompt="a", max_new_tokens=99), LIMITS, None)
    own = info.value.renamed(names)
    assert own.field == "max_tokens" and own.message.startswith("max_tokens must be in [0, 32]")
    indexed = InvalidArgument("texts[3]", "texts[3] must not be empty").renamed(names)
    assert (indexed.field, indexed.message) == ("text_input[3]", "text_input[3] must not be empty")
    kept = InvalidArgument("stop[1]", "stop[1] must not be empty")
    assert kept.renamed(names) is kept  # no entry: the canonical name is the front's


def test_results_to_proto() -> None:
    items = [ClassifyItem(labels=(("pos", 0.75), ("neg", 0.25)), truncated=True, input_tokens=7)]
    resp = convert.classify_response(items, model="m", version="3", request_id="r")
    assert resp.results[0].labels[0].name == "pos" and resp.results[0].truncated
    assert resp.usage.prompt_tokens == 7 and resp.model_version == "3"
    chunk = convert.generate_chunk(TokenEvent("a", (5,)), "r")
    assert chunk.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not chunk.HasField("usage")
    last = convert.generate_chunk(TokenEvent("", (), FinishReason.STOP, 4, 9), "r")
    assert last.finish_reason == pb.STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 9)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidArgument("texts", "texts must hold a text"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFound("model 'x' is not served"), grpc.StatusCode.NOT_FOUND),
        (QueueFull("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ShuttingDown("bye"), grpc.StatusCode.UNAVAILABLE),
        (ServerDraining("bye"), grpc.StatusCode.UNAVAILABLE),
        (BackendFailure("/secret/path failed"), grpc.StatusCode.INTERNAL),
        (RuntimeError("/secret/path failed"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_for(exc: Exception, code: grpc.StatusCode) -> None:
    mapped = status_for(exc)
    assert mapped.code == code
    if code == grpc.StatusCode.INTERNAL:
        assert mapped.message == INTERNAL_MESSAGE and mapped.internal


def test_rich_status_carries_bad_request() -> None:
    status = rich_status(status_for(InvalidArgument("texts[3]", "texts[3] has 600 tokens")))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "texts[3]"
    assert not rich_status(status_for(ModelNotFound("x"))).details


def test_rich_status_of_a_full_queue_carries_retry_info() -> None:
    status = rich_status(status_for(QueueFull("full", retry_after_s=0.25)))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    (detail,) = status.details
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 250


@pytest.mark.parametrize(
    "exc",
    [
        QueueFull("full", retry_after_s=0.25),
        InvalidArgument("texts[3]", "texts[3] has 600 tokens"),
        ModelNotFound("no model 'x'"),
    ],
)
def test_grpc_status_is_the_rich_status_and_built_once(exc: Exception) -> None:
    mapped = status_for(exc)
    status = grpc_status(mapped)
    assert status == rpc_status.to_status(rich_status(mapped))
    assert grpc_status(status_for(exc)) is status  # the same answer again: not rebuilt
    if isinstance(exc, QueueFull):  # the retry hint, to the millisecond, is part of the answer
        later = grpc_status(status_for(QueueFull("full", retry_after_s=0.3)))
        assert later != status
        assert later == rpc_status.to_status(rich_status(status_for(QueueFull("full", 0.3))))

"""Fuzzed requests of every message of headrace.v1.Inference, over a real socket.

Random fields, sizes, unicode (NUL, astral planes, "²"), NaN/inf floats, integers at the
ends of their ranges, and wire bytes protobuf itself never writes (invalid UTF-8, lone
surrogates, corrupt fields). Whatever arrives, the answer is OK, INVALID_ARGUMENT or
NOT_FOUND (the contract's codes for a caller's input, protos/headrace/v1/inference.proto),
never INTERNAL or UNKNOWN, no traceback in the details, and the server serves afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc
from hypothesis import event, example, given
from hypothesis import strategies as st

from tests.reliability.conftest import FUZZ, RunningServer

CALLER_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
U32, U64, I32 = 2**32 - 1, 2**64 - 1, 2**31

# -- strategies ----------------------------------------------------------------------------------

# every code point protobuf can carry (no surrogates: those go over the wire below), NUL first
chars = st.characters(codec="utf-8")
text = st.one_of(
    st.text(chars, max_size=12),
    st.text(chars, min_size=200, max_size=2_000),
    st.sampled_from(["", "\x00", "a\x00b", "²", "\U0001f600" * 50, "word " * 400, "\ufeff"]),
)
WEIRD_NAMES = ["no-such-model", "x" * 100_000, "\x00", "tiny-classifier\x00"]
WEIRD_VERSIONS = ["01", "0", "2", "-1", "²", "٣", "9" * 5_000, " 1", "1.0"]


def model_for(*names: str) -> st.SearchStrategy[str]:
    """A served name (or "" for the default) half the time, else a wrong or odd one."""
    served = st.sampled_from(["", *names])
    return st.one_of(served, served, st.sampled_from(WEIRD_NAMES), st.text(chars, max_size=40))


model = model_for("tiny-classifier", "tiny-generator")
version = st.one_of(
    st.sampled_from(["", "1"]), st.sampled_from(WEIRD_VERSIONS), st.text(chars, max_size=12)
)
u32 = st.one_of(st.integers(0, 8), st.integers(0, 200), st.integers(0, U32))
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def fields(draw: st.DrawFn, table: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """One value per field from (valid, anything) strategies: a third of the messages valid
    throughout, a third with one field off (each check on its own), a third anything."""
    mode = draw(st.sampled_from(["valid", "one off", "anything"]))
    odd = draw(st.sampled_from(sorted(table))) if mode == "one off" else None
    return {
        name: draw(anything if mode == "anything" or name == odd else valid)
        for name, (valid, anything) in table.items()
    }


some_text = st.text(chars, min_size=1, max_size=30)
served_version = st.sampled_from(["", "1"])
small = st.integers(0, 4)
unit = st.floats(0.0625, 1.0, width=32)


@st.composite
def classify_request(draw: st.DrawFn) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        **fields(
            draw,
            {
                "model": (st.sampled_from(["", "tiny-classifier"]), model_for("tiny-classifier")),
                "texts": (st.lists(some_text, min_size=1, max_size=4), st.lists(text, max_size=40)),
                "top_k": (small, u32),
                "request_id": (st.sampled_from(["", "id-1"]), text),
                "model_version": (served_version, version),
                "reject_overlong": (st.booleans(), st.booleans()),
            },
        )
    )


@st.composite
def generate_request(draw: st.DrawFn) -> pb.GenerateRequest:
    f = fields(
        draw,
        {
            "model": (st.sampled_from(["", "tiny-generator"]), model_for("tiny-generator")),
            "prompt": (some_text, text),
            "max_new_tokens": (st.integers(0, 6), u32),
            "stop": (st.lists(some_text, max_size=2), st.lists(text, max_size=8)),
            "request_id": (st.sampled_from(["", "id-1"]), text),
            "model_version": (served_version, version),
            "reject_overlong": (st.booleans(), st.booleans()),
            "temperature": (st.sampled_from([0.0, 0.7]), f32),
            "top_p": (st.just(0.0) | unit, f32),
            "top_k": (small, u32),
            "repetition_penalty": (st.just(0.0) | unit, f32),
            "seed": (st.none() | small, st.none() | st.integers(0, U64)),
            "ignore_eos": (st.booleans(), st.booleans()),
        },
    )
    sampling = {k: f.pop(k) for k in ("temperature", "top_p", "top_k", "repetition_penalty",
                                      "ignore_eos", "seed")}  # fmt: skip
    msg = pb.GenerateRequest(**f)
    if sampling["seed"] is None:
        del sampling["seed"]
    msg.sampling.CopyFrom(pb.SamplingParams(**sampling))
    return msg


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# bytes of a string field protobuf's own writers never make: invalid UTF-8, a lone surrogate
# (as Python's "surrogatepass" writes it), overlong forms, a cut multi-byte character
bad_utf8 = st.one_of(
    st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"a\x80b"]),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=4).map(
        lambda s: s.encode("utf-8", "surrogatepass")
    ),
    st.binary(min_size=1, max_size=30).filter(lambda b: not _is_utf8(b)),
)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- calling ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(fuzz_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.address) as ch:
        yield ch
    # the server still serves: a real call of each task
    with grpc.insecure_channel(fuzz_server.address) as ch:
        assert_serving(ch)


def assert_serving(channel: grpc.Channel) -> None:
    stub = pb_grpc.InferenceStub(channel)
    assert stub.Classify(pb.ClassifyRequest(texts=["still here"]), timeout=30).results
    out = stub.Generate(pb.GenerateRequest(prompt="the", max_new_tokens=2), timeout=30)
    assert out.usage.completion_tokens <= 2


def outcome(fn: Callable[[], Any]) -> grpc.StatusCode:
    """The status `fn` ended with; fails on a code a caller's input must not cause."""
    try:
        fn()
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        details = err.details() or ""  # type: ignore[attr-defined]
        assert code in CALLER_CODES, (code, details[:300])
        assert "Traceback" not in details and "Unexpected <class" not in details, details[:300]
        event(code.name)  # --hypothesis-show-statistics: how often each code came
        return code  # type: ignore[no-any-return]
    event("OK")
    return grpc.StatusCode.OK


def raw(channel: grpc.Channel, method: str, streaming: tuple[bool, bool]) -> Any:
    """A multicallable that sends bytes as they are and returns bytes."""
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    return kinds[streaming](
        method,
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )


# -- headrace.v1.Inference ------------------------------------------------------------------


@FUZZ
@given(request=classify_request())
@example(request=pb.ClassifyRequest(texts=["a"], model_version="²"))
@example(request=pb.ClassifyRequest(texts=["a"], model_version="9" * 5_000))
@example(request=pb.ClassifyRequest(texts=["a"], request_id="\x1f"))  # not sendable as metadata
@example(request=pb.ClassifyRequest(texts=["a"], model="x" * 100_000))  # a 100 kB error message
def test_classify(channel: grpc.Channel, request: pb.ClassifyRequest) -> None:
    stub = pb_grpc.InferenceStub(channel)
    outcome(lambda: stub.Classify(request, timeout=30))


@FUZZ
@given(requests=st.lists(classify_request(), min_size=1, max_size=4))
def test_classify_stream(channel: grpc.Channel, requests: list[pb.ClassifyRequest]) -> None:
    stub = pb_grpc.InferenceStub(channel)
    outcome(lambda: list(stub.ClassifyStream(iter(requests), timeout=30)))


@FUZZ
@given(request=generate_request())
@example(request=pb.GenerateRequest(prompt="a", model_version="²"))
@example(request=pb.GenerateRequest(prompt="a", request_id="é"))
def test_generate(channel: grpc.Channel, request: pb.GenerateRequest) -> None:
    stub = pb_grpc.InferenceStub(channel)
    outcome(lambda: stub.Generate(request, timeout=30))


@FUZZ
@given(request=generate_request())
@example(request=pb.GenerateRequest(prompt="a", model_version="9" * 5_000))
def test_generate_stream(channel: grpc.Channel, request: pb.GenerateRequest) -> None:
    stub = pb_grpc.InferenceStub(channel)
    outcome(lambda: list(stub.GenerateStream(request, timeout=30)))


@FUZZ
@given(task=st.integers(-I32, I32 - 1))
def test_list_models(channel: grpc.Channel, task: int) -> None:
    stub = pb_grpc.InferenceStub(channel)
    assert outcome(lambda: stub.ListModels(pb.ListModelsRequest(task=task), timeout=30)) in (
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
    )


@FUZZ
@given(service=st.one_of(model, st.sampled_from(["headrace.v1.Inference", ""])))
def test_health_check(channel: grpc.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    outcome(lambda: stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30))


# -- bytes protobuf never writes ----------------------------------------------------------------

# (method, request/response streaming, a valid request, the numbers of its string fields)
WIRE = [
    ("/headrace.v1.Inference/Classify", (False, False), pb.ClassifyRequest(texts=["a"]), (1, 2, 4, 5)),
    ("/headrace.v1.Inference/ClassifyStream", (True, True), pb.ClassifyRequest(texts=["a"]), (1, 2, 4, 5)),
    ("/headrace.v1.Inference/Generate", (False, False), pb.GenerateRequest(prompt="a"), (1, 2, 5, 6, 7)),
    ("/headrace.v1.Inference/GenerateStream", (False, True), pb.GenerateRequest(prompt="a"), (1, 2, 5, 6, 7)),
    ("/headrace.v1.Inference/ListModels", (False, False), pb.ListModelsRequest(), ()),
    ("/grpc.health.v1.Health/Check", (False, False), health_pb2.HealthCheckRequest(), (1,)),
]  # fmt: skip


@FUZZ
@given(
    case=st.sampled_from(WIRE),
    field=st.integers(0, 7),
    payload=bad_utf8,
    tail=st.one_of(st.just(b""), st.binary(max_size=40)),
)
@example(case=WIRE[0], field=1, payload=b"\xed\xa0\x80", tail=b"")  # a lone surrogate in texts
@example(case=WIRE[0], field=1, payload=b"a", tail=b"\xff\xff\xff")  # a corrupt field
def test_wire_bytes_protobuf_never_writes(
    channel: grpc.Channel, case: tuple, field: int, payload: bytes, tail: bytes
) -> None:
    method, streaming, valid, strings = case
    data = valid.SerializeToString()
    if strings:
        data += length_field(strings[field % len(strings)], payload)
    data += tail
    call = raw(channel, method, streaming)
    if streaming[0]:
        code = outcome(lambda: list(call(iter([valid.SerializeToString(), data]), timeout=30)))
    elif streaming[1]:
        code = outcome(lambda: list(call(data, timeout=30)))
    else:
        code = outcome(lambda: call(data, timeout=30))
    if not _parses(type(valid), data):  # an undecodable request is the caller's error
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def _parses(kind: Any, data: bytes) -> bool:
    try:
        kind.FromString(data)
    except Exception:
        return False
    return True


@FUZZ
@given(case=st.sampled_from(WIRE), data=st.binary(max_size=200))
def test_random_bytes_as_a_request(channel: grpc.Channel, case: tuple, data: bytes) -> None:
    method, streaming, _, _ = case
    call = raw(channel, method, streaming)
    if streaming[0]:
        outcome(lambda: list(call(iter([data]), timeout=30)))
    elif streaming[1]:
        outcome(lambda: list(call(data, timeout=30)))
    else:
        outcome(lambda: call(data, timeout=30))


@pytest.mark.parametrize("request_id", ["\x1f", "é", "x" * 129, "a\nb"])
def test_request_ids_that_cannot_travel_as_metadata_are_refused_by_name(
    channel: grpc.Channel, request_id: str
) -> None:
    from headrace.server.kserve.pb import grpc_service_pb2 as kpb
    from headrace.server.kserve.pb import grpc_service_pb2_grpc as kpb_grpc

    from tests.e2e.conftest import bad_request_field

    stub = pb_grpc.InferenceStub(channel)
    calls = {
        "request_id": [
            lambda: stub.Classify(pb.ClassifyRequest(texts=["a"], request_id=request_id)),
            lambda: list(stub.ClassifyStream(iter([pb.ClassifyRequest(texts=["a"])] * 2 + [
                pb.ClassifyRequest(texts=["a"], request_id=request_id)]))),
            lambda: list(stub.GenerateStream(pb.GenerateRequest(prompt="a", request_id=request_id))),
        ],
        "id": [
            lambda: kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                kpb.ModelInferRequest(model_name="tiny-classifier", id=request_id)
            )
        ],
    }  # fmt: skip
    for field, fns in calls.items():
        for fn in fns:
            with pytest.raises(grpc.RpcError) as err:
                fn()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert bad_request_field(err.value) == field
    assert (
        stub.Classify(pb.ClassifyRequest(texts=["a"], request_id="ok-id-1")).request_id == "ok-id-1"
    )

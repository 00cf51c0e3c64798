"""Fuzzed requests of the Open Inference Protocol front (inference.GRPCInferenceService).

ModelInferRequest built from random tensors (names, datatypes, shapes from -2**63 to
2**63-1, typed or raw contents, NaN/inf), random parameters and a random
`sampling_parameters` JSON (NaN, huge integers, wrong types), on unary and streaming
calls; the metadata calls with random names and versions. Every call ends OK,
INVALID_ARGUMENT or NOT_FOUND; a stream's per-request errors are a caller's errors too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from headrace.server.errors import INTERNAL_MESSAGE
from headrace.server.kserve.pb import grpc_service_pb2 as pb
from headrace.server.kserve.pb import grpc_service_pb2_grpc as pb_grpc
from hypothesis import example, given
from hypothesis import strategies as st

from tests.reliability.conftest import FUZZ, RunningServer
from tests.reliability.test_fuzz_grpc import (
    assert_serving,
    chars,
    fields,
    model,
    outcome,
    served_version,
    some_text,
    text,
    version,
)

I64 = 2**63
NAMES = ["text", "text_input", "stream", "sampling_parameters", "exclude_input_in_output"]
DATATYPES = ["BYTES", "BOOL", "FP32", "FP64", "FP16", "INT64", "INT32", "UINT8", "UINT64"]
SAMPLING_KEYS = [
    "temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "repetition_penalty",
    "ignore_eos",
]  # fmt: skip

dim = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 3, 64, 2**31, 2**62, -(2**63), 2**63 - 1]),
    st.integers(-I64, I64 - 1),
)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(chars, max_size=20),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


@st.composite
def sampling_json(draw: st.DrawFn) -> bytes:
    doc: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from([*SAMPLING_KEYS, "nope"]), max_size=5)):
        small = st.one_of(st.integers(0, 70), st.floats(0, 2))
        doc[key] = draw(st.one_of(small, json_value))
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=20))  # not JSON, perhaps not UTF-8
    if draw(st.integers(0, 9)) == 0:
        return json.dumps(draw(json_value)).encode()  # not an object
    return json.dumps(doc).encode()  # NaN and Infinity as Python's json writes them


@st.composite
def param(draw: st.DrawFn) -> pb.InferParameter:
    kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "none"]))
    values = {
        "bool": st.booleans(),
        "int64": st.integers(-I64, I64 - 1),
        "string": st.text(chars, max_size=20),
        "double": st.floats(allow_nan=True, allow_infinity=True),
        "uint64": st.integers(0, 2**64 - 1),
    }
    if kind == "none":
        return pb.InferParameter()
    return pb.InferParameter(**{f"{kind}_param": draw(values[kind])})


params = st.dictionaries(
    st.one_of(
        st.sampled_from(["stream", "triton_enable_empty_final_response", "binary_data_output"]),
        st.text(chars, max_size=10),
    ),
    param(),
    max_size=3,
)


@st.composite
def tensor(draw: st.DrawFn, raw: list[bytes] | None) -> pb.ModelInferRequest.InferInputTensor:
    name = draw(st.one_of(st.sampled_from(NAMES), st.text(chars, max_size=10)))
    datatype = draw(st.one_of(st.sampled_from(DATATYPES), st.text(chars, max_size=6)))
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype)
    if name == "sampling_parameters" and draw(st.booleans()):
        elements = [draw(sampling_json())]
    else:
        elements = [s.encode() for s in draw(st.lists(text, max_size=4))]
    shape = draw(st.one_of(st.just([len(elements)]), st.lists(dim, max_size=3)))
    t.shape.extend(shape)
    for key, value in draw(params).items():
        t.parameters[key].CopyFrom(value)
    if raw is not None:  # raw_input_contents: BYTES as length-prefixed elements, or junk
        if draw(st.booleans()):
            raw.append(b"".join(len(e).to_bytes(4, "little") + e for e in elements))
        else:
            raw.append(draw(st.binary(max_size=40)))
        return t
    contents = t.contents
    which = draw(st.sampled_from(["bytes", "fp32", "fp64", "int64", "bool", "uint", "none"]))
    if which == "bytes":
        contents.bytes_contents.extend(elements)
    elif which == "fp32":
        contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=4)))
    elif which == "fp64":
        contents.fp64_contents.extend(draw(st.lists(st.floats(), max_size=4)))
    elif which == "int64":
        contents.int64_contents.extend(draw(st.lists(st.integers(-I64, I64 - 1), max_size=4)))
    elif which == "bool":
        contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=4)))
    elif which == "uint":
        contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=4)))
    return t


def _classify(*texts: bytes, version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny-classifier", model_version=version)
    t = request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    t.contents.bytes_contents.extend(texts)
    return request


def _generate(sampling: bytes, prompt: bytes = b"the") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny-generator")
    t = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(prompt)
    s = request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    s.contents.bytes_contents.append(sampling)
    return request


@st.composite
def infer_request(draw: st.DrawFn) -> pb.ModelInferRequest:
    """Two in three well formed (for a served model, its tensors' names), one in three anything."""
    shape = draw(st.sampled_from(["classify", "generate", "anything"]))
    valid_sampling = st.fixed_dictionaries(
        {}, optional={"max_tokens": st.integers(1, 6), "temperature": st.just(0.5),
                      "seed": st.integers(0, 9), "stop": st.lists(some_text, max_size=2)}
    ).map(lambda d: json.dumps(d).encode())  # fmt: skip
    f = fields(
        draw,
        {
            "texts": (st.lists(some_text, min_size=1, max_size=4), st.lists(text, max_size=40)),
            "prompt": (some_text, text),
            "sampling": (valid_sampling, sampling_json()),
            "version": (served_version, version),
            "id": (st.sampled_from(["", "id-1"]), text),
            "parameters": (st.just({}), params),
        },
    )
    if shape == "classify":
        request = _classify(*(t.encode() for t in f["texts"]), version=f["version"])
    elif shape == "generate":
        request = _generate(f["sampling"], prompt=f["prompt"].encode())
        request.model_version = f["version"]
        if draw(st.booleans()):
            flag = request.inputs.add(name="stream", datatype="BOOL", shape=[1])
            flag.contents.bool_contents.append(draw(st.booleans()))
    else:
        request = pb.ModelInferRequest(model_name=draw(model), model_version=f["version"])
    request.id = f["id"]
    if shape != "anything":
        for key, value in f["parameters"].items():
            request.parameters[key].CopyFrom(value)
        return request
    raw: list[bytes] | None = [] if draw(st.integers(0, 3)) == 0 else None
    request.inputs.extend(draw(st.lists(tensor(raw), max_size=4)))
    if raw is not None:
        request.raw_input_contents.extend(raw)
        if draw(st.integers(0, 4)) == 0:
            request.raw_input_contents.append(b"extra")
    for key, value in draw(params).items():
        request.parameters[key].CopyFrom(value)
    for name in draw(
        st.lists(
            st.one_of(st.sampled_from(["label", "probabilities", "text_output"]), text), max_size=3
        )
    ):
        request.outputs.add(name=name)
    return request


@pytest.fixture(scope="module")
def stub(fuzz_server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(fuzz_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    with grpc.insecure_channel(fuzz_server.address) as channel:
        assert_serving(channel)
        live = pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest())
        assert live.ready


@FUZZ
@given(request=infer_request())
@example(request=_classify(b"a", b"\xff"))
@example(request=_classify(b"a", version="\u00b2"))
@example(request=_generate(b'{"max_tokens": 1e400, "temperature": NaN}'))
@example(request=_generate(b'{"seed": 100000000000000000000000000000, "top_k": -1}'))
@example(request=_generate(b'{"stop": [""], "top_p": Infinity}'))
def test_model_infer(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> None:
    outcome(lambda: stub.ModelInfer(request, timeout=30))


@FUZZ
@given(requests=st.lists(infer_request(), min_size=1, max_size=3))
def test_model_stream_infer(
    stub: pb_grpc.GRPCInferenceServiceStub, requests: list[pb.ModelInferRequest]
) -> None:
    answers: list[pb.ModelStreamInferResponse] = []
    outcome(lambda: answers.extend(stub.ModelStreamInfer(iter(requests), timeout=30)))
    for answer in answers:  # a request's error is answered in the stream: never ours
        assert INTERNAL_MESSAGE not in answer.error_message
        assert "Traceback" not in answer.error_message


@FUZZ
@given(
    name=model, version=version, rpc=st.sampled_from(["ModelReady", "ModelMetadata", "ModelConfig"])
)
@example(name="tiny-classifier", version="\u00b2", rpc="ModelReady")
@example(name="tiny-generator", version="9" * 5_000, rpc="ModelMetadata")
def test_metadata_calls(
    stub: pb_grpc.GRPCInferenceServiceStub, name: str, version: str, rpc: str
) -> None:
    request_type = {
        "ModelReady": pb.ModelReadyRequest,
        "ModelMetadata": pb.ModelMetadataRequest,
        "ModelConfig": pb.ModelConfigRequest,
    }[rpc]
    outcome(lambda: getattr(stub, rpc)(request_type(name=name, version=version), timeout=30))


@FUZZ
@given(name=text, ready=st.booleans())
def test_repository_index(stub: pb_grpc.GRPCInferenceServiceStub, name: str, ready: bool) -> None:
    request = pb.RepositoryIndexRequest(repository_name=name, ready=ready)
    outcome(lambda: stub.RepositoryIndex(request, timeout=30))

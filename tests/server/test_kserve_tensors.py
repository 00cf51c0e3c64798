"""server/kserve/tensors.py: both encodings of the Open Inference Protocol, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from headrace.server.kserve.pb import grpc_service_pb2 as pb
from headrace.server.kserve.tensors import (
    Tensor,
    decode_bytes,
    encode_bytes,
    read_inputs,
    wants_raw,
    write_outputs,
)
from headrace.server.types import InvalidArgument
from hypothesis import given
from hypothesis import strategies as st

Input = pb.ModelInferRequest.InferInputTensor


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_bytes_elements_round_trip(items: list[bytes]) -> None:
    assert decode_bytes("t", encode_bytes(items)) == items


@given(st.binary(max_size=64))
def test_any_raw_bytes_decode_or_fail_naming_the_tensor(raw: bytes) -> None:
    try:
        decode_bytes("t", raw)
    except InvalidArgument as exc:
        assert exc.field == "t" and "'t'" in exc.message


def test_length_prefix_is_little_endian() -> None:
    assert encode_bytes([b"ab"]) == b"\x02\x00\x00\x00ab"


def test_raw_and_typed_inputs_read_alike() -> None:
    values = np.arange(6, dtype="<f4").reshape(2, 3)
    raw = pb.ModelInferRequest(
        inputs=[Input(name="x", datatype="FP32", shape=[2, 3])],
        raw_input_contents=[values.tobytes()],
    )
    typed = pb.ModelInferRequest(
        inputs=[
            Input(
                name="x",
                datatype="FP32",
                shape=[2, 3],
                contents=pb.InferTensorContents(fp32_contents=values.ravel().tolist()),
            )
        ]
    )
    assert np.array_equal(read_inputs(raw)["x"].data, read_inputs(typed)["x"].data)
    assert wants_raw(raw) and not wants_raw(typed)


@pytest.mark.parametrize(
    ("tensor", "raw", "words"),
    [
        (Input(name="x", datatype="FP32", shape=[3]), [b"\x00" * 8], "needs 12 raw bytes"),
        (Input(name="x", datatype="BYTES", shape=[2]), [encode_bytes([b"a"])], "needs 2 elements"),
        (Input(name="x", datatype="BYTES", shape=[1]), [b"\x05\x00\x00\x00ab"], "runs past"),
        (Input(name="x", datatype="INT9", shape=[1]), [b"\x00"], "unknown datatype"),
        (Input(name="x", datatype="FP32", shape=[-1]), [b""], "negative"),
    ],
)
def test_bad_tensors_name_themselves(tensor: Input, raw: list[bytes], words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        read_inputs(pb.ModelInferRequest(inputs=[tensor], raw_input_contents=raw))
    assert info.value.field == "x" and words in info.value.message


def test_raw_entries_must_match_the_inputs() -> None:
    request = pb.ModelInferRequest(
        inputs=[Input(name="a", datatype="BOOL", shape=[1])], raw_input_contents=[b"\x01", b"\x01"]
    )
    with pytest.raises(InvalidArgument) as info:
        read_inputs(request)
    assert info.value.field == "raw_input_contents"


def test_outputs_raw_or_typed() -> None:
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    tensors = [
        Tensor("label", "BYTES", [1], [b"pos"]),
        Tensor("probabilities", "FP32", [1, 2], probs, {"labels": '["neg", "pos"]'}),
    ]
    raw = pb.ModelInferResponse()
    write_outputs(raw, tensors, raw=True)
    assert raw.raw_output_contents == [encode_bytes([b"pos"]), probs.tobytes()]
    assert raw.outputs[1].parameters["labels"].string_param == '["neg", "pos"]'
    typed = pb.ModelInferResponse()
    write_outputs(typed, tensors, raw=False)
    assert not typed.raw_output_contents
    assert list(typed.outputs[0].contents.bytes_contents) == [b"pos"]
    assert list(typed.outputs[1].contents.fp32_contents) == [0.25, 0.75]

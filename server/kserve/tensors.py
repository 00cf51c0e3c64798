"""Open Inference Protocol tensors <-> numpy arrays and byte strings, both encodings.

A tensor's elements travel either typed, in `contents` (one repeated field per
datatype), or raw, in the request's `raw_input_contents[i]` / the response's
`raw_output_contents[i]` (little-endian elements, row-major; a BYTES element is
a 4-byte little-endian length and its bytes, concatenated). A request uses one
or the other for all its inputs; the response answers in raw unless the client
asked for typed contents (see `wants_raw`).

    tensors = read_inputs(request)        # {name: Tensor}, shapes and sizes checked
    write_outputs(response, [Tensor("label", "BYTES", [2], [b"pos", b"neg"])], raw=True)

Errors raise InvalidArgument naming the tensor (INVALID_ARGUMENT, BadRequest field = its name).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from headrace.server.kserve.pb import grpc_service_pb2 as pb
from headrace.server.types import InvalidArgument

# datatype -> (numpy dtype of the raw form, InferTensorContents field of the typed form)
DATATYPES: dict[str, tuple[str, str | None]] = {
    "BOOL": ("?", "bool_contents"),
    "UINT8": ("<u1", "uint_contents"),
    "UINT16": ("<u2", "uint_contents"),
    "UINT32": ("<u4", "uint_contents"),
    "UINT64": ("<u8", "uint64_contents"),
    "INT8": ("<i1", "int_contents"),
    "INT16": ("<i2", "int_contents"),
    "INT32": ("<i4", "int_contents"),
    "INT64": ("<i8", "int64_contents"),
    "FP16": ("<f2", None),  # raw only: the protocol has no typed field for it
    "FP32": ("<f4", "fp32_contents"),
    "FP64": ("<f8", "fp64_contents"),
}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Tensor:
    """One tensor: `data` is a numpy array, or a list of byte strings for BYTES."""

    name: str
    datatype: str
    shape: Sequence[int]
    data: Any  # np.ndarray | list[bytes]
    parameters: dict[str, Any] | None = None  # InferParameter values: bool, int, float, str


def bad(name: str, message: str) -> InvalidArgument:
    return InvalidArgument(name, f"input tensor '{name}': {message}")


def decode_bytes(name: str, raw: bytes) -> list[bytes]:
    """4-byte little-endian length + bytes, repeated -> the elements."""
    out, pos, end = [], 0, len(raw)
    view = memoryview(raw)
    while pos < end:
        if pos + 4 > end:
            raise bad(name, "raw BYTES data ends inside an element's 4-byte length")
        (n,) = _LENGTH.unpack_from(raw, pos)
        pos += 4
        if pos + n > end:
            raise bad(name, f"raw BYTES element of {n} bytes runs past the end of the data")
        out.append(bytes(view[pos : pos + n]))
        pos += n
    return out


def encode_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(b)) + b for b in items)


def _count(name: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise bad(name, f"shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def read_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    """Every input of `request` decoded and checked against its own shape and datatype."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            "raw_input_contents",
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs",
        )
    out: dict[str, Tensor] = {}
    for i, t in enumerate(request.inputs):
        name = t.name
        if not name:
            raise InvalidArgument("inputs", f"input {i} has no name")
        if name in out:
            raise bad(name, "given twice")
        shape = list(t.shape)
        n = _count(name, shape)
        if t.datatype == "BYTES":
            if raw:
                items = decode_bytes(name, raw[i])
            else:
                items = list(t.contents.bytes_contents)
            if len(items) != n:
                raise bad(name, f"shape {shape} needs {n} elements, got {len(items)}")
            data: Any = items
        elif t.datatype in DATATYPES:
            dtype, typed = DATATYPES[t.datatype]
            if raw:
                size = np.dtype(dtype).itemsize
                if len(raw[i]) != n * size:
                    raise bad(
                        name,
                        f"shape {shape} of {t.datatype} needs {n * size} raw bytes, "
                        f"got {len(raw[i])}",
                    )
                data = np.frombuffer(raw[i], dtype=dtype).reshape(shape)
            else:
                if typed is None:
                    raise bad(name, f"{t.datatype} travels in raw_input_contents only")
                values = getattr(t.contents, typed)
                if len(values) != n:
                    raise bad(name, f"shape {shape} needs {n} elements, got {len(values)}")
                data = np.asarray(values, dtype=dtype).reshape(shape)
        else:
            raise bad(name, f"unknown datatype {t.datatype!r}")
        out[name] = Tensor(name, t.datatype, shape, data)
    return out


def param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def set_param(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def wants_raw(request: pb.ModelInferRequest) -> bool:
    """Raw outputs unless the client sent typed contents, or asked with `binary_data_output`.

    tritonclient reads numeric outputs from raw_output_contents only, and it always
    sends raw inputs; a client that sent typed contents gets typed contents back."""
    asked = request.parameters.get("binary_data_output")
    if asked is not None and asked.WhichOneof("parameter_choice") == "bool_param":
        return asked.bool_param
    return bool(request.raw_input_contents) or not request.inputs


def write_outputs(response: pb.ModelInferResponse, tensors: Sequence[Tensor], *, raw: bool) -> None:
    for t in tensors:
        out = response.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        for key, value in (t.parameters or {}).items():
            set_param(out.parameters[key], value)
        if t.datatype == "BYTES":
            if raw:
                response.raw_output_contents.append(encode_bytes(t.data))
            else:
                out.contents.bytes_contents.extend(t.data)
            continue
        dtype, typed = DATATYPES[t.datatype]
        array = np.ascontiguousarray(t.data, dtype=dtype)
        if raw or typed is None:
            response.raw_output_contents.append(array.tobytes())
        else:
            getattr(out.contents, typed).extend(array.ravel().tolist())

"""KServe v2 requests for Seldon MLServer, from bench/protos/kserve_v2.proto.

The proto is compiled on first use into .cache/bench/kserve/ with grpcio-tools (no
generated code is committed for a bench-only protocol).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path(__file__).resolve().parent / "protos"
OUT = ROOT / ".cache" / "bench" / "kserve"


def pb() -> ModuleType:
    """The compiled kserve_v2_pb2 module."""
    target = OUT / "kserve_v2_pb2.py"
    src = PROTO_DIR / "kserve_v2.proto"
    if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
        from grpc_tools import protoc

        OUT.mkdir(parents=True, exist_ok=True)
        rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={OUT}", str(src)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {src} ({rc})")
    if str(OUT) not in sys.path:
        sys.path.insert(0, str(OUT))
    return importlib.import_module("kserve_v2_pb2")


def infer_request(model: str, text: str) -> object:
    """One text for MLServer's Hugging Face runtime: input `inputs`, BYTES, shape [1]."""
    m = pb()
    tensor = m.ModelInferRequest.InferInputTensor(
        name="inputs",
        datatype="BYTES",
        shape=[1],
        contents=m.InferTensorContents(bytes_contents=[text.encode()]),
    )
    tensor.parameters["content_type"].string_param = "str"
    return m.ModelInferRequest(model_name=model, inputs=[tensor])


def infer_request_bytes(model: str, text: str) -> bytes:
    return infer_request(model, text).SerializeToString()  # type: ignore[attr-defined]


def top_label(response_bytes: bytes) -> str:
    """The first output's first BYTES element (the runtime's JSON-encoded prediction)."""
    m = pb()
    resp = m.ModelInferResponse.FromString(response_bytes)
    out = resp.outputs[0]
    if out.contents.bytes_contents:
        return out.contents.bytes_contents[0].decode()
    return resp.raw_output_contents[0].decode(errors="replace") if resp.raw_output_contents else ""

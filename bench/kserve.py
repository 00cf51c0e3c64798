"""Open Inference Protocol (KServe v2) requests, from the server's own compiled proto.

One copy of the protocol in the tree: protos/kserve/inference/grpc_service.proto,
compiled into headrace.server.kserve.pb. Two tensor conventions are sent:

- headrace's (`text` BYTES [-1] in raw_input_contents, as tritonclient sends it);
- Seldon MLServer's Hugging Face runtime (`inputs` BYTES [1], typed contents,
  content_type "str"), for the MLServer peer.
"""

from __future__ import annotations

import json
import struct

import numpy as np
from headrace.server.kserve.pb import grpc_service_pb2 as pb

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def headrace_request(model: str, texts: list[str]) -> pb.ModelInferRequest:
    """`text` BYTES [N], raw: 4-byte little-endian length + UTF-8, per text."""
    raw = b"".join(struct.pack("<I", len(b)) + b for b in (t.encode() for t in texts))
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[len(texts)]
    )
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[raw])


def headrace_top_labels(response_bytes: bytes) -> list[str]:
    """The best label of each text: the argmax column of `probabilities`, named by its `labels`."""
    resp = pb.ModelInferResponse.FromString(response_bytes)
    index = {o.name: i for i, o in enumerate(resp.outputs)}
    out = resp.outputs[index["probabilities"]]
    labels = json.loads(out.parameters["labels"].string_param)
    probs = np.frombuffer(resp.raw_output_contents[index["probabilities"]], "<f4")
    probs = probs.reshape(list(out.shape))
    return [labels[j] for j in probs.argmax(axis=1)]


def mlserver_request(model: str, text: str) -> pb.ModelInferRequest:
    """One text for MLServer's Hugging Face runtime: input `inputs`, BYTES, shape [1]."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="inputs",
        datatype="BYTES",
        shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[text.encode()]),
    )
    tensor.parameters["content_type"].string_param = "str"
    return pb.ModelInferRequest(model_name=model, inputs=[tensor])


def mlserver_top_label(response_bytes: bytes) -> str:
    """The first output's first BYTES element (the runtime's JSON-encoded prediction)."""
    resp = pb.ModelInferResponse.FromString(response_bytes)
    out = resp.outputs[0]
    if out.contents.bytes_contents:
        return out.contents.bytes_contents[0].decode()
    return resp.raw_output_contents[0].decode(errors="replace") if resp.raw_output_contents else ""

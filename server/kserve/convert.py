"""Open Inference Protocol messages <-> what the engine takes and returns.

The only place where this front turns tensors into engine arguments and
engine results back into tensors. The tensor conventions (docs/serving.md):

    classify  in:  text BYTES [-1]
              out: label BYTES [-1] (best label of each text),
                   probabilities FP32 [-1, num_labels] (label order: the `labels` parameter)
    generate  in:  text_input BYTES [1]; optional stream BOOL [1],
                   sampling_parameters BYTES [1] (JSON), exclude_input_in_output BOOL [1]
              out: text_output BYTES [-1]

(the generate names are those of Triton's vLLM backend, so its clients work unchanged).

This front checks what is its own (tensor names, datatypes, shapes, UTF-8, the
sampling_parameters JSON's keys and value types) and builds the typed calls every
front builds (ClassifyCall, GenerateCall in server/types.py); the values are checked
by the model, in server/calls.py, the same checks and messages as the native front's.
`tensor_error` turns such an error's canonical field into the tensor carrying it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from headrace.server.kserve.pb import grpc_service_pb2 as pb
from headrace.server.kserve.tensors import Tensor, bad, set_param
from headrace.server.repository import LoadedVersion
from headrace.server.types import (
    SAMPLING_NAMES,
    ClassifyCall,
    ClassifyItem,
    GenerateCall,
    InvalidArgument,
    SamplingParams,
    Task,
)

TEXT, LABEL, PROBABILITIES = "text", "label", "probabilities"
TEXT_INPUT, STREAM, SAMPLING, EXCLUDE_INPUT = (
    "text_input",
    "stream",
    "sampling_parameters",
    "exclude_input_in_output",
)
TEXT_OUTPUT = "text_output"

# name -> (datatype, shape, optional) as ModelMetadata and ModelConfig declare them
CLASSIFY_INPUTS = {TEXT: ("BYTES", [-1], False)}
GENERATE_INPUTS = {
    TEXT_INPUT: ("BYTES", [1], False),
    STREAM: ("BOOL", [1], True),
    SAMPLING: ("BYTES", [1], True),
    EXCLUDE_INPUT: ("BOOL", [1], True),
}
SAMPLING_KEYS = (
    "temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "repetition_penalty",
    "ignore_eos",
)  # fmt: skip

# canonical field (server/calls.py) -> the name this front's caller wrote, inside its tensor
OWN_NAMES = {
    "texts[]": "element {}",
    "texts": "text",
    "prompt": "text_input",
    **SAMPLING_NAMES,
    "stop": "stop",
}


def tensor_of(field: str) -> str:
    """The tensor an engine field name belongs to: "texts[2]" -> "text", "prompt" -> "text_input"."""
    head = field.split("[", 1)[0].split(".", 1)[0]
    if head == "texts":
        return TEXT
    if head == "prompt":
        return TEXT_INPUT
    if head in ("sampling", "max_new_tokens", "stop"):
        return SAMPLING
    return field


def tensor_error(exc: InvalidArgument) -> InvalidArgument:
    """A model's check failure (canonical field) as this front reports it: the tensor named.

    ("texts[1]", "texts[1] must not be empty") -> ("text", "input tensor 'text': element 1
    must not be empty"); ("sampling.temperature", ...) -> ("sampling_parameters", ...)."""
    own = exc.renamed(OWN_NAMES)
    return bad(tensor_of(exc.field), own.message)


def _check_names(given: dict[str, Tensor], known: dict[str, Any]) -> None:
    for name in given:
        if name not in known:
            raise bad(name, f"unknown input; the model takes {', '.join(sorted(known))}")
    for name, (_, _, optional) in known.items():
        if not optional and name not in given:
            raise InvalidArgument(name, f"input tensor '{name}' is missing")


def _one(tensor: Tensor, datatype: str) -> Any:
    """The single element of a [1] (or [1, 1]) tensor."""
    if tensor.datatype != datatype:
        raise bad(tensor.name, f"datatype must be {datatype}, got {tensor.datatype}")
    if len(tensor.shape) not in (1, 2) or math.prod(tensor.shape) != 1:
        raise bad(tensor.name, f"shape must be [1], got {list(tensor.shape)}")
    data = tensor.data
    return data[0] if isinstance(data, list) else data.reshape(-1)[0].item()


def _utf8(name: str, value: bytes, index: int | None = None) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        where = "" if index is None else f" element {index}"
        raise bad(name, f"{where.strip() or 'the element'} is not UTF-8 text") from None


def requested_outputs(request: pb.ModelInferRequest, known: Sequence[str]) -> list[str]:
    """The outputs to send, in the model's order (all when none is requested)."""
    if not request.outputs:
        return list(known)
    asked = {o.name for o in request.outputs}
    for name in asked:
        if name not in known:
            raise InvalidArgument(
                name, f"output tensor '{name}' does not exist; the model has {', '.join(known)}"
            )
    return [n for n in known if n in asked]


# -- classify ----------------------------------------------------------------------------------


def classify_call(
    tensors: dict[str, Tensor], model: str, version: str, request_id: str
) -> ClassifyCall:
    """The `text` tensor's elements as a ClassifyCall (every label: `probabilities` has them all)."""
    _check_names(tensors, CLASSIFY_INPUTS)
    t = tensors[TEXT]
    if t.datatype != "BYTES":
        raise bad(TEXT, f"datatype must be BYTES, got {t.datatype}")
    if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
        raise bad(TEXT, f"shape must be [-1] (one element per text), got {list(t.shape)}")
    items: list[bytes] = t.data
    texts = tuple(_utf8(TEXT, raw, i) for i, raw in enumerate(items))
    return ClassifyCall(texts=texts, model=model, version=version, request_id=request_id)


def classify_outputs(
    items: Sequence[ClassifyItem], labels: Sequence[str], wanted: Sequence[str]
) -> list[Tensor]:
    """label [N] and probabilities [N, L] in manifest label order."""
    column = {name: j for j, name in enumerate(labels)}
    probs = np.zeros((len(items), len(labels)), dtype=np.float32)
    for i, item in enumerate(items):
        for name, score in item.labels:
            probs[i, column[name]] = score
    out = []
    for name in wanted:
        if name == LABEL:
            best = [item.labels[0][0].encode() for item in items]
            out.append(Tensor(LABEL, "BYTES", [len(items)], best))
        else:
            out.append(
                Tensor(
                    PROBABILITIES,
                    "FP32",
                    [len(items), len(labels)],
                    probs,
                    {"labels": json.dumps(list(labels))},
                )
            )
    return out


# -- generate ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferGenerate:
    """A generate request read from its tensors: the typed call and how to answer it."""

    call: GenerateCall
    stream: bool
    include_prompt: bool  # prepend the prompt to the first text_output


def _number(key: str, value: Any, *, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or (not integer and math.isnan(value)):
        kind = "an integer" if integer else "a number"
        raise bad(SAMPLING, f"{key} must be {kind}")
    return value


def _sampling(raw: bytes | None) -> tuple[SamplingParams, int, tuple[str, ...]]:
    """sampling_parameters JSON -> (SamplingParams, max_new_tokens (0: default), stop).

    Types are checked here, ranges by the model (server/calls.py). As vLLM, an absent key
    is its default, top_p 0 and repetition_penalty 0 turn them off, top_k -1 is off."""
    if raw is None:
        return SamplingParams(), 0, ()
    try:
        doc = json.loads(_utf8(SAMPLING, raw) or "{}")
    except ValueError:
        raise bad(SAMPLING, "must hold a JSON object") from None
    if not isinstance(doc, dict):
        raise bad(SAMPLING, "must hold a JSON object")
    unknown = sorted(set(doc) - set(SAMPLING_KEYS))
    if unknown:
        raise bad(SAMPLING, f"unknown keys {unknown}; known: {', '.join(SAMPLING_KEYS)}")

    def get(key: str, default: Any, integer: bool = False) -> Any:
        value = doc.get(key)
        return default if value is None else _number(key, value, integer=integer)

    top_k = int(get("top_k", 0, integer=True))
    seed = doc.get("seed")
    stop = doc.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad(SAMPLING, "stop must be a string or a list of strings")
    ignore_eos = doc.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad(SAMPLING, "ignore_eos must be true or false")
    params = SamplingParams(
        temperature=float(get("temperature", 0.0)),
        top_p=float(get("top_p", 1.0)) or 1.0,
        top_k=0 if top_k == -1 else top_k,
        repetition_penalty=float(get("repetition_penalty", 1.0)) or 1.0,
        seed=None if seed is None else int(_number("seed", seed, integer=True)),
        ignore_eos=ignore_eos,
    )
    return params, int(get("max_tokens", 0, integer=True)), tuple(stop)


def generate_call(
    tensors: dict[str, Tensor], model: str = "", version: str = "", request_id: str = ""
) -> InferGenerate:
    _check_names(tensors, GENERATE_INPUTS)
    prompt = _utf8(TEXT_INPUT, _one(tensors[TEXT_INPUT], "BYTES"))
    stream = bool(_one(tensors[STREAM], "BOOL")) if STREAM in tensors else False
    raw = _one(tensors[SAMPLING], "BYTES") if SAMPLING in tensors else None
    sampling, max_new_tokens, stop = _sampling(raw)
    # As Triton's vLLM backend: the prompt is prepended unless excluded; streams exclude it
    # by default.
    if EXCLUDE_INPUT in tensors:
        include = not _one(tensors[EXCLUDE_INPUT], "BOOL")
    else:
        include = not stream
    call = GenerateCall(
        prompt=prompt,
        model=model,
        version=version,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop=stop,
        request_id=request_id,
    )
    return InferGenerate(call, stream, include)


def text_output(text: str) -> Tensor:
    return Tensor(TEXT_OUTPUT, "BYTES", [1], [text.encode()])


def generate_parameters(
    response: pb.ModelInferResponse, finish_reason: str, prompt_tokens: int, completion: int
) -> None:
    """Why the generation ended and its token counts, as response parameters."""
    set_param(response.parameters["finish_reason"], finish_reason)
    set_param(response.parameters["prompt_tokens"], prompt_tokens)
    set_param(response.parameters["completion_tokens"], completion)


# -- metadata ----------------------------------------------------------------------------------


def _tensor_meta(
    name: str, datatype: str, shape: list[int], **params: Any
) -> pb.ModelMetadataResponse.TensorMetadata:
    meta = pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)
    for key, value in params.items():
        set_param(meta.parameters[key], value)
    return meta


def model_metadata(versions: Sequence[LoadedVersion], backend: str) -> pb.ModelMetadataResponse:
    newest = versions[0]
    manifest = newest.manifest
    response = pb.ModelMetadataResponse(
        name=newest.name, versions=[v.version for v in versions], platform=backend
    )
    set_param(response.parameters["task"], manifest.task.value)
    if manifest.task is Task.CLASSIFY:
        labels = json.dumps(list(manifest.labels))
        set_param(response.parameters["labels"], labels)
        response.inputs.append(_tensor_meta(TEXT, "BYTES", [-1]))
        response.outputs.append(_tensor_meta(LABEL, "BYTES", [-1]))
        response.outputs.append(
            _tensor_meta(PROBABILITIES, "FP32", [-1, len(manifest.labels)], labels=labels)
        )
    else:
        for name, (datatype, shape, optional) in GENERATE_INPUTS.items():
            response.inputs.append(_tensor_meta(name, datatype, shape, optional=optional))
        response.outputs.append(_tensor_meta(TEXT_OUTPUT, "BYTES", [-1]))
    return response


_CONFIG_TYPES = {"BYTES": pb.TYPE_STRING, "BOOL": pb.TYPE_BOOL, "FP32": pb.TYPE_FP32}


def model_config(newest: LoadedVersion, backend: str) -> pb.ModelConfig:
    """The Triton model configuration a client reads: tensors and whether it is decoupled."""
    manifest = newest.manifest
    generate = manifest.task is Task.GENERATE
    config = pb.ModelConfig(
        name=newest.name,
        platform=backend,
        backend="headrace",
        max_batch_size=0,  # the batch is the text dimension of `text` itself
    )
    if generate:  # several responses per request, on ModelStreamInfer
        config.model_transaction_policy.decoupled = True
    inputs = GENERATE_INPUTS if generate else CLASSIFY_INPUTS
    for name, (datatype, shape, optional) in inputs.items():
        config.input.append(
            pb.ModelInput(
                name=name, data_type=_CONFIG_TYPES[datatype], dims=shape, optional=optional
            )
        )
    outputs = (
        [(TEXT_OUTPUT, "BYTES", [-1])]
        if generate
        else [(LABEL, "BYTES", [-1]), (PROBABILITIES, "FP32", [-1, len(manifest.labels)])]
    )
    for name, datatype, shape in outputs:
        config.output.append(
            pb.ModelOutput(name=name, data_type=_CONFIG_TYPES[datatype], dims=shape)
        )
    return config

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
Validation errors raise InvalidField naming the tensor; an engine error naming a
request field (InvalidInput) is renamed to its tensor by `tensor_of`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from headrace.server.errors import InvalidField
from headrace.server.kserve.pb import grpc_service_pb2 as pb
from headrace.server.kserve.tensors import Tensor, bad, set_param
from headrace.server.manifest import Limits
from headrace.server.repository import LoadedVersion
from headrace.server.types import ClassifyItem, SamplingParams, Task

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
MAX_TOP_K = 1_000_000  # bound for top_k when the model's vocabulary size is unknown


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


def _check_names(given: dict[str, Tensor], known: dict[str, Any]) -> None:
    for name in given:
        if name not in known:
            raise bad(name, f"unknown input; the model takes {', '.join(sorted(known))}")
    for name, (_, _, optional) in known.items():
        if not optional and name not in given:
            raise InvalidField(name, f"input tensor '{name}' is missing")


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
            raise InvalidField(
                name, f"output tensor '{name}' does not exist; the model has {', '.join(known)}"
            )
    return [n for n in known if n in asked]


# -- classify ----------------------------------------------------------------------------------


def classify_texts(tensors: dict[str, Tensor], limits: Limits) -> list[str]:
    _check_names(tensors, CLASSIFY_INPUTS)
    t = tensors[TEXT]
    if t.datatype != "BYTES":
        raise bad(TEXT, f"datatype must be BYTES, got {t.datatype}")
    if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
        raise bad(TEXT, f"shape must be [-1] (one element per text), got {list(t.shape)}")
    items: list[bytes] = t.data
    if not items:
        raise bad(TEXT, "holds no text")
    if len(items) > limits.max_texts:
        raise bad(TEXT, f"at most {limits.max_texts} texts per request, got {len(items)}")
    texts = []
    for i, raw in enumerate(items):
        if not raw:
            raise bad(TEXT, f"element {i} is empty")
        texts.append(_utf8(TEXT, raw, i))
    return texts


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
class GenerateCall:
    """A generate request read from its tensors: GeneratorModel.prepare's arguments and more."""

    prompt: str
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_prompt: bool  # prepend the prompt to the first text_output


def _number(key: str, value: Any, *, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or (not integer and math.isnan(value)):
        kind = "an integer" if integer else "a number"
        raise InvalidField(SAMPLING, f"input tensor '{SAMPLING}': {key} must be {kind}")
    return value  # type: ignore[no-any-return]


def _sampling(
    raw: bytes | None, vocab_size: int | None
) -> tuple[SamplingParams, int, tuple[str, ...]]:
    """sampling_parameters JSON -> (SamplingParams, max_new_tokens (0: default), stop)."""
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

    def limit(key: str, lo: float, hi: float, default: float) -> float:
        if doc.get(key) is None:
            return default
        value = _number(key, doc[key])
        if not lo <= value <= hi:
            raise bad(SAMPLING, f"{key} must be in [{lo:g}, {hi:g}]")
        return float(value)

    temperature = limit("temperature", 0.0, 100.0, 0.0)
    top_p = limit("top_p", 0.0, 1.0, 1.0) or 1.0
    repetition_penalty = limit("repetition_penalty", 0.0, 10.0, 1.0) or 1.0
    top_k = int(_number("top_k", doc.get("top_k", 0) or 0, integer=True))
    k_max = vocab_size or MAX_TOP_K
    if top_k < -1 or top_k > k_max:
        raise bad(SAMPLING, f"top_k must be -1 or 0 (off) up to {k_max}")
    max_tokens = int(_number("max_tokens", doc.get("max_tokens", 0) or 0, integer=True))
    if max_tokens < 0:
        raise bad(SAMPLING, "max_tokens must not be negative")
    seed = doc.get("seed")
    if seed is not None:
        seed = int(_number("seed", seed, integer=True))
        if not 0 <= seed < 2**63:
            raise bad(SAMPLING, "seed must be in [0, 2**63)")
    stop = doc.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad(SAMPLING, "stop must be a string or a list of strings")
    ignore_eos = doc.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad(SAMPLING, "ignore_eos must be true or false")
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        repetition_penalty=repetition_penalty,
        seed=seed,
        ignore_eos=ignore_eos,
    )
    return params, max_tokens, tuple(stop)


def generate_call(tensors: dict[str, Tensor], vocab_size: int | None) -> GenerateCall:
    _check_names(tensors, GENERATE_INPUTS)
    prompt = _utf8(TEXT_INPUT, _one(tensors[TEXT_INPUT], "BYTES"))
    if not prompt:
        raise bad(TEXT_INPUT, "must not be empty")
    stream = bool(_one(tensors[STREAM], "BOOL")) if STREAM in tensors else False
    raw = _one(tensors[SAMPLING], "BYTES") if SAMPLING in tensors else None
    sampling, max_new_tokens, stop = _sampling(raw, vocab_size)
    # As Triton's vLLM backend: the prompt is prepended unless excluded; streams exclude it
    # by default.
    if EXCLUDE_INPUT in tensors:
        include = not _one(tensors[EXCLUDE_INPUT], "BOOL")
    else:
        include = not stream
    return GenerateCall(prompt, max_new_tokens, sampling, stop, stream, include)


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

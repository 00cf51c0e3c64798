"""server/kserve/convert.py: tensors -> the typed calls every front builds; the model's
checks (server/calls.py) reported with the tensor named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from headrace.server.calls import check_classify, check_generate
from headrace.server.kserve.convert import classify_call, generate_call, tensor_error, tensor_of
from headrace.server.kserve.tensors import Tensor
from headrace.server.manifest import Limits
from headrace.server.types import InvalidArgument

LIMITS = Limits(max_new_tokens=32, max_texts=4, max_stop_strings=2, max_stop_length=5)


def tensors(prompt: str = "hi", **extra: object) -> dict[str, Tensor]:
    out = {"text_input": Tensor("text_input", "BYTES", [1], [prompt.encode()])}
    for name, value in extra.items():
        if isinstance(value, bool):
            out[name] = Tensor(name, "BOOL", [1], np.array([value]))
        else:
            out[name] = Tensor(name, "BYTES", [1], [json.dumps(value).encode()])
    return out


def test_vllm_sampling_parameters_map_onto_the_engine() -> None:
    infer = generate_call(
        tensors(sampling_parameters={"temperature": 0.7, "top_k": -1, "top_p": 0.9,
                                     "max_tokens": 5, "seed": 3, "stop": "\n"}),
        "m", "2", "r-1",
    )  # fmt: skip
    call = infer.call
    assert call.sampling.temperature == 0.7 and call.sampling.top_k == 0  # -1: off, as vLLM
    assert call.sampling.top_p == 0.9 and call.sampling.seed == 3
    assert call.max_new_tokens == 5 and call.stop == ("\n",)
    assert (call.model, call.version, call.request_id) == ("m", "2", "r-1")
    assert infer.include_prompt and not infer.stream  # as vLLM's backend without `stream`


def test_streams_exclude_the_prompt_unless_asked() -> None:
    assert not generate_call(tensors(stream=True)).include_prompt
    asked = generate_call(tensors(stream=True, exclude_input_in_output=False))
    assert asked.include_prompt
    assert not generate_call(tensors(exclude_input_in_output=True)).include_prompt


@pytest.mark.parametrize(
    "sampling", [{"seed": 1.5}, {"best_of": 2}, {"stop": [1]}, [], {"temperature": "hot"}]
)
def test_malformed_sampling_parameters_name_the_tensor(sampling: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        generate_call(tensors(sampling_parameters=sampling))
    assert info.value.field == "sampling_parameters"
    assert info.value.message.startswith("input tensor 'sampling_parameters': ")


@pytest.mark.parametrize(
    ("sampling", "key"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_k": 101}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c"]}, "stop"),
        ({"stop": [""]}, "stop[0]"),
    ],
)
def test_out_of_range_values_fail_the_shared_checks_and_name_the_tensor(
    sampling: object, key: str
) -> None:
    # The values are well-formed JSON, so the front passes them; the model's check (the
    # one the native front's calls pass too) refuses them, and the front names its tensor.
    call = generate_call(tensors(sampling_parameters=sampling)).call
    with pytest.raises(InvalidArgument) as info:
        check_generate(call, LIMITS, vocab_size=100)
    err = tensor_error(info.value)
    assert err.field == "sampling_parameters"
    assert err.message.startswith(f"input tensor 'sampling_parameters': {key} ")


def test_classify_checks_are_the_shared_ones_with_the_element_named() -> None:
    texts = Tensor("text", "BYTES", [3], [b"a", b"", b"c"])
    call = classify_call({"text": texts}, "m", "", "r")
    assert call.texts == ("a", "", "c") and call.top_k == 0
    with pytest.raises(InvalidArgument) as info:
        check_classify(call, LIMITS)
    err = tensor_error(info.value)
    assert (err.field, err.message) == ("text", "input tensor 'text': element 1 must not be empty")
    empty = tensor_error(
        _raised(lambda: check_generate(generate_call(tensors("")).call, LIMITS, None))
    )
    assert empty.field == "text_input" and "text_input must not be empty" in empty.message


def _raised(fn: object) -> InvalidArgument:
    try:
        fn()  # type: ignore[operator]
    except InvalidArgument as exc:
        return exc
    raise AssertionError("no InvalidArgument")


def test_engine_fields_become_tensor_names() -> None:
    assert tensor_of("texts[2]") == "text"
    assert tensor_of("prompt") == "text_input"
    assert tensor_of("sampling.temperature") == "sampling_parameters"
    assert tensor_of("max_new_tokens") == "sampling_parameters"
    assert tensor_of("stop[0]") == "sampling_parameters"

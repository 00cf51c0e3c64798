"""server/kserve/convert.py: generate tensors -> engine arguments, field names -> tensor names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from headrace.server.errors import InvalidField
from headrace.server.kserve.convert import generate_call, tensor_of
from headrace.server.kserve.tensors import Tensor


def tensors(prompt: str = "hi", **extra: object) -> dict[str, Tensor]:
    out = {"text_input": Tensor("text_input", "BYTES", [1], [prompt.encode()])}
    for name, value in extra.items():
        if isinstance(value, bool):
            out[name] = Tensor(name, "BOOL", [1], np.array([value]))
        else:
            out[name] = Tensor(name, "BYTES", [1], [json.dumps(value).encode()])
    return out


def test_vllm_sampling_parameters_map_onto_the_engine() -> None:
    call = generate_call(
        tensors(sampling_parameters={"temperature": 0.7, "top_k": -1, "top_p": 0.9,
                                     "max_tokens": 5, "seed": 3, "stop": "\n"}),
        vocab_size=100,
    )  # fmt: skip
    assert call.sampling.temperature == 0.7 and call.sampling.top_k == 0  # -1: off, as vLLM
    assert call.sampling.top_p == 0.9 and call.sampling.seed == 3
    assert call.max_new_tokens == 5 and call.stop == ("\n",)
    assert call.include_prompt and not call.stream  # as vLLM's backend without `stream`


def test_streams_exclude_the_prompt_unless_asked() -> None:
    assert not generate_call(tensors(stream=True), None).include_prompt
    asked = generate_call(tensors(stream=True, exclude_input_in_output=False), None)
    assert asked.include_prompt
    assert not generate_call(tensors(exclude_input_in_output=True), None).include_prompt


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": -1}, {"top_k": 101}, {"seed": 1.5}, {"best_of": 2}, {"stop": [1]}, []],
)
def test_bad_sampling_parameters_name_the_tensor(sampling: object) -> None:
    with pytest.raises(InvalidField) as info:
        generate_call(tensors(sampling_parameters=sampling), vocab_size=100)
    assert info.value.field == "sampling_parameters"


def test_engine_fields_become_tensor_names() -> None:
    assert tensor_of("texts[2]") == "text"
    assert tensor_of("prompt") == "text_input"
    assert tensor_of("sampling.temperature") == "sampling_parameters"
    assert tensor_of("max_new_tokens") == "sampling_parameters"
    assert tensor_of("stop[0]") == "sampling_parameters"

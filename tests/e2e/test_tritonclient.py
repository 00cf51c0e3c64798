"""The real tritonclient[grpc] (its own virtualenv, protobuf 6) against a real server.

One probe run (tests/e2e/triton_probe.py) makes every call; the tests read its
answers and compare them with the native headrace.v1 API on the same server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.e2e.conftest import RunningServer
from tests.e2e.triton_venv import run_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLASSIFIER, GENERATOR = "tiny-classifier", "tiny-generator"
PROMPT, SEED = "the weather today", 7
TEXTS = ["what a lovely day", "this is awful", "meh"]


@pytest.fixture(scope="module")
def probe(server: RunningServer) -> Any:
    return run_json(
        HERE / "triton_probe.py", server.address, CLASSIFIER, GENERATOR, PROMPT, str(SEED)
    )


@pytest.fixture(scope="module")
def native(server: RunningServer) -> Any:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        yield stub


def test_probes_and_metadata(probe: Any) -> None:
    assert probe["live"] is True and probe["ready"] is True
    assert probe["model_ready"] is True and probe["unknown_ready"] is False
    assert probe["server_metadata"]["name"] == "headrace"
    meta = probe["classifier_metadata"]
    assert meta["name"] == CLASSIFIER and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["label"]["datatype"] == "BYTES"
    assert outputs["probabilities"]["datatype"] == "FP32"
    gen = probe["generator_metadata"]
    assert [i["name"] for i in gen["inputs"]] == [
        "text_input", "stream", "sampling_parameters", "exclude_input_in_output",
    ]  # fmt: skip
    assert [o["name"] for o in gen["outputs"]] == ["text_output"]
    assert probe["generator_config"]["config"]["model_transaction_policy"]["decoupled"] is True
    assert "model_transaction_policy" not in probe["classifier_config"]["config"]
    index = {(m["name"], m["version"], m["state"]) for m in probe["index"]["models"]}
    assert index == {(CLASSIFIER, "1", "READY"), (GENERATOR, "1", "READY")}


def test_classify_matches_the_native_api(probe: Any, native: Any, server: RunningServer) -> None:
    labels = list(server.model(CLASSIFIER).manifest.labels)
    got = probe["classify"]
    assert got["id"] == "probe-1" and got["dtype"] == "float32"
    assert got["order"] == labels  # the probabilities output names its columns
    answer = native.Classify(pb.ClassifyRequest(model=CLASSIFIER, texts=TEXTS), timeout=30)
    want = [{lab.name: lab.score for lab in r.labels} for r in answer.results]
    expected = np.array([[row[name] for name in labels] for row in want])
    assert np.abs(np.array(got["probabilities"]) - expected).max() <= 1e-6
    assert got["labels"] == [r.labels[0].name for r in answer.results]
    assert probe["only_probabilities"] == ["probabilities"]


def test_errors_name_the_tensor(probe: Any) -> None:
    errors = probe["errors"]
    assert errors["wrong_datatype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'text'" in errors["wrong_datatype"]["message"]
    assert "BYTES" in errors["wrong_datatype"]["message"]
    assert errors["missing_input"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'texts'" in errors["missing_input"]["message"]  # the unknown one, named
    assert errors["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert errors["empty_text"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "element 1" in errors["empty_text"]["message"]
    assert errors["stream_on_unary"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'stream'" in errors["stream_on_unary"]["message"]
    assert errors["load"]["status"] == "StatusCode.UNIMPLEMENTED"


def _native_text(native: Any, **sampling: Any) -> tuple[list[str], str]:
    request = pb.GenerateRequest(
        model=GENERATOR,
        prompt=PROMPT,
        max_new_tokens=12,
        sampling=pb.SamplingParams(temperature=0.9, top_k=20, seed=SEED),
    )
    chunks = list(native.GenerateStream(request, timeout=60))
    finish = pb.FinishReason.Name(chunks[-1].finish_reason)
    return [c.text for c in chunks], finish


def test_stream_matches_native_generate_stream(probe: Any, native: Any) -> None:
    texts, finish = _native_text(native)
    stream = probe["stream"]
    assert all(isinstance(c, str) for c in stream["chunks"]), stream["chunks"]
    assert "".join(stream["chunks"]) == "".join(texts)
    assert len(stream["chunks"]) > 1  # one response per text chunk, not one at the end
    assert stream["finish_reason"] == finish.lower()
    # exclude_input_in_output=true, no stream: the completion alone in one response
    assert stream["whole"] == "".join(texts) and stream["whole_id"] == "gen-2"
    # ModelInfer: the prompt, then the completion (Triton's vLLM backend does the same)
    assert probe["unary_generate"] == PROMPT + "".join(texts)


def test_a_bad_request_in_a_stream_answers_an_error(probe: Any) -> None:
    message = probe["stream"]["error"]
    assert message and "sampling_parameters" in message and "temperature" in message


def test_example_script_classifies_and_streams(server: RunningServer) -> None:
    out = run_json(
        ROOT / "examples" / "tritonclient_demo.py",
        "--url", server.address, "--classifier", CLASSIFIER, "--generator", GENERATOR,
        "--json",
    )  # fmt: skip
    assert len(out["classify"]) == 3 and all(r["label"] for r in out["classify"])
    assert out["stream"]["chunks"] >= 1 and out["stream"]["text"]
    json.dumps(out)


# The two metadata maps are MLServer's extension; Triton's proto has no field there.
EXTENSIONS = {
    ("inference.ModelMetadataResponse", "parameters"),
    ("inference.ModelMetadataResponse.TensorMetadata", "parameters"),
}


def test_our_proto_has_the_numbers_of_tritonclients() -> None:
    """Every field, enum value and method we declare is Triton's, with its number and type."""
    from headrace.server.kserve.pb import grpc_service_pb2 as ours

    theirs = run_json(HERE / "triton_descriptors.py")
    mine: dict[str, Any] = {}

    def walk(desc: Any) -> None:
        mine[desc.full_name] = {
            f.name: [
                f.number,
                f.type,
                f.is_repeated,
                (f.message_type or f.enum_type).full_name
                if (f.message_type or f.enum_type)
                else "",
            ]
            for f in desc.fields
        }
        for nested in desc.nested_types:
            walk(nested)

    for desc in ours.DESCRIPTOR.message_types_by_name.values():
        walk(desc)
    for enum in ours.DESCRIPTOR.enum_types_by_name.values():
        mine[enum.full_name] = {v.name: [v.number] for v in enum.values}
    checked = 0
    for message, fields in mine.items():
        for name, spec in fields.items():
            if (message, name) in EXTENSIONS or message.endswith("Entry"):
                continue
            assert theirs["messages"].get(message, {}).get(name) == spec, (message, name)
            checked += 1
    assert checked > 100
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in service.methods:
        spec = [m.input_type.full_name, m.output_type.full_name]
        assert theirs["methods"][m.name] == [*spec, m.client_streaming, m.server_streaming]

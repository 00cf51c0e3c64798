"""The Open Inference Protocol front through a client compiled from its proto alone.

What tritonclient cannot show (tests/e2e/test_tritonclient.py covers the rest):
typed contents, the metadata parameters, the BadRequest field, one batch for a
KServe and a native call, cancellation, RESOURCE_EXHAUSTED and the drain.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from headrace.server.kserve.pb import grpc_service_pb2 as pb
from headrace.server.kserve.pb import grpc_service_pb2_grpc as pb_grpc
from headrace.v1 import inference_pb2 as npb
from headrace.v1 import inference_pb2_grpc as npb_grpc

from tests.e2e.conftest import RunningServer, add_variant, bad_request_field

Input = pb.ModelInferRequest.InferInputTensor


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def raw_strings(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def classify(model: str, texts: list[str], *, raw: bool = True) -> pb.ModelInferRequest:
    data = [t.encode() for t in texts]
    if raw:
        tensor = Input(name="text", datatype="BYTES", shape=[len(texts)])
        return pb.ModelInferRequest(
            model_name=model, inputs=[tensor], raw_input_contents=[raw_strings(data)]
        )
    tensor = Input(
        name="text",
        datatype="BYTES",
        shape=[len(texts)],
        contents=pb.InferTensorContents(bytes_contents=data),
    )
    return pb.ModelInferRequest(model_name=model, inputs=[tensor])


def generate(model: str, prompt: str, *, stream: bool, **sampling: object) -> pb.ModelInferRequest:
    def one(name: str, datatype: str, **contents: object) -> Input:
        return Input(
            name=name, datatype=datatype, shape=[1], contents=pb.InferTensorContents(**contents)
        )

    return pb.ModelInferRequest(
        model_name=model,
        id="g-1",
        inputs=[
            one("text_input", "BYTES", bytes_contents=[prompt.encode()]),
            one("stream", "BOOL", bool_contents=[stream]),
            one("sampling_parameters", "BYTES", bytes_contents=[json.dumps(sampling).encode()]),
        ],
    )


@pytest.fixture()
def stub(server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_typed_contents_in_typed_out_raw_in_raw_out(stub, server: RunningServer) -> None:
    texts = ["good", "bad one"]
    typed = stub.ModelInfer(classify("tiny-classifier", texts, raw=False))
    raw = stub.ModelInfer(classify("tiny-classifier", texts, raw=True))
    assert not typed.raw_output_contents
    label, probs = typed.outputs
    assert (label.name, label.datatype, list(label.shape)) == ("label", "BYTES", [2])
    assert (probs.name, probs.datatype, list(probs.shape)) == ("probabilities", "FP32", [2, 3])
    from_raw = np.frombuffer(raw.raw_output_contents[1], "<f4").reshape(2, 3)
    assert np.array_equal(np.array(probs.contents.fp32_contents).reshape(2, 3), from_raw)
    assert raw.raw_output_contents[0] == raw_strings(list(label.contents.bytes_contents))
    # binary_data_output asks for one or the other whatever the inputs used
    request = classify("tiny-classifier", texts, raw=False)
    request.parameters["binary_data_output"].bool_param = True
    assert len(stub.ModelInfer(request).raw_output_contents) == 2


def test_metadata_names_the_label_order(stub, server: RunningServer) -> None:
    labels = list(server.model("tiny-classifier").manifest.labels)
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny-classifier"))
    assert json.loads(meta.parameters["labels"].string_param) == labels
    assert meta.parameters["task"].string_param == "classify"
    probs = next(o for o in meta.outputs if o.name == "probabilities")
    assert list(probs.shape) == [-1, len(labels)]
    assert json.loads(probs.parameters["labels"].string_param) == labels


def test_invalid_argument_names_the_tensor(stub) -> None:
    cases = [
        (pb.ModelInferRequest(model_name="tiny-classifier"), "text"),  # missing
        (classify("tiny-classifier", ["a", ""]), "text"),
        (generate("tiny-generator", "hi", stream=False, temperature="hot"), "sampling_parameters"),
        (generate("tiny-generator", "hi", stream=False, max_tokens=10**6), "sampling_parameters"),
        (generate("tiny-generator", "hi", stream=False, unknown=1), "sampling_parameters"),
    ]
    bad_raw = classify("tiny-classifier", ["abc"])
    bad_raw.raw_input_contents[0] = bad_raw.raw_input_contents[0][:-1]
    cases.append((bad_raw, "text"))
    for request, tensor in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert bad_request_field(info.value) == tensor
        assert f"'{tensor}'" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(classify("no-such-model", ["x"]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_kserve_and_a_native_call_share_one_batch(start_server, model_repo: Path) -> None:
    from headrace.server.metrics import REGISTRY

    # A batch of 2 leaves only when full (or after 20 s): both calls coming back means one batch.
    add_variant(
        model_repo, "tiny-classifier", "pair", batching={"max_batch": 2, "max_delay_ms": 20000}
    )
    running = start_server(model_repo)

    def batches() -> tuple[float, float]:
        labels = {"model": "pair"}
        count = REGISTRY.get_sample_value("headrace_batch_size_count", labels) or 0.0
        return count, REGISTRY.get_sample_value("headrace_batch_size_sum", labels) or 0.0

    before = batches()
    with grpc.insecure_channel(running.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(
            classify("pair", ["one"]), timeout=10
        )
        native = npb_grpc.InferenceStub(channel).Classify.future(
            npb.ClassifyRequest(model="pair", texts=["two"]), timeout=10
        )
        assert kserve.result().outputs[0].name == "label"
        assert len(native.result().results) == 1
    count, total = batches()
    assert (count - before[0], total - before[1]) == (1, 2)


def test_cancelling_a_stream_frees_the_slot(start_server, long_models: Path) -> None:
    running = start_server(long_models)
    model = running.model("long-generator")
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = generate("long-generator", "the", stream=True, max_tokens=400, ignore_eos=True)
        call = stub.ModelStreamInfer(iter([request]))
        first = next(call)
        assert first.infer_response.id == "g-1" and not first.error_message
        assert model.active_slots == 1
        call.cancel()
        wait_for(lambda: model.active_slots == 0)
        after = stub.ModelInfer(generate("long-generator", "the", stream=False, max_tokens=3))
        assert after.parameters["completion_tokens"].int64_param <= 3


def test_resource_exhausted_when_slots_and_queue_full(start_server, model_repo: Path) -> None:
    add_variant(model_repo, "tiny-generator", "busy", batching={"max_batch": 1, "max_queue": 0})
    running = start_server(model_repo)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = generate("busy", "the service", stream=False, max_tokens=64, ignore_eos=True)
        futures = [stub.ModelInfer.future(request) for _ in range(8)]
        codes = set()
        for f in futures:
            try:
                f.result()
                codes.add(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.add(err.code())
        assert codes == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_drain_refuses_new_calls_and_reports_not_ready(start_server, long_models: Path) -> None:
    running = start_server(long_models, grace_period_s=10.0)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = generate("long-generator", "the", stream=True, max_tokens=200, ignore_eos=True)
        call = stub.ModelStreamInfer(iter([request]))
        next(call)
        stopping = running.submit(lambda: running.server.stop())
        # not ready at once, while calls are still served for a moment (clients move away)
        while stub.ServerReady(pb.ServerReadyRequest()).ready:
            pass
        assert stub.ServerLive(pb.ServerLiveRequest()).live is True
        assert stub.ModelReady(pb.ModelReadyRequest(name="long-generator")).ready is False
        wait_for(lambda: running.server.gate.draining)  # then the GOAWAY: new calls refused
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(classify("tiny-classifier", ["new call"]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(call)  # the stream in flight runs to its end
        assert rest[-1].infer_response.parameters["completion_tokens"].int64_param == 200
        stopping.result(15)

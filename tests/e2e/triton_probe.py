"""Runs in the tritonclient virtualenv (tests/e2e/triton_venv.py): tritonclient.grpc and numpy only.

    python triton_probe.py ADDRESS CLASSIFIER GENERATOR PROMPT SEED

Prints one JSON object: what each call answered, or the error it raised.
"""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

address, classifier, generator, prompt, seed = sys.argv[1:6]
client = grpcclient.InferenceServerClient(address)
out = {}


def error(fn):
    try:
        fn()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return None


def text_input(name, values, datatype="BYTES"):
    dtypes = {"BYTES": object, "BOOL": bool, "FP32": np.float32}
    array = np.array(values, dtype=dtypes[datatype])
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


out["live"] = client.is_server_live()
out["ready"] = client.is_server_ready()
out["model_ready"] = client.is_model_ready(classifier)
out["unknown_ready"] = client.is_model_ready("no-such-model")
out["server_metadata"] = client.get_server_metadata(as_json=True)
out["classifier_metadata"] = client.get_model_metadata(classifier, as_json=True)
out["generator_metadata"] = client.get_model_metadata(generator, as_json=True)
out["classifier_config"] = client.get_model_config(classifier, as_json=True)
out["generator_config"] = client.get_model_config(generator, as_json=True)
out["index"] = client.get_model_repository_index(as_json=True)

texts = ["what a lovely day", "this is awful", "meh"]
result = client.infer(
    classifier,
    [text_input("text", [t.encode() for t in texts])],
    outputs=[
        grpcclient.InferRequestedOutput("label"),
        grpcclient.InferRequestedOutput("probabilities"),
    ],
    request_id="probe-1",
)
response = result.get_response(as_json=True)
out["classify"] = {
    "id": response.get("id"),
    "labels": [b.decode() for b in result.as_numpy("label")],
    "probabilities": result.as_numpy("probabilities").astype(float).tolist(),
    "dtype": str(result.as_numpy("probabilities").dtype),
    "order": json.loads(result.get_output("probabilities").parameters["labels"].string_param),
}
only = client.infer(
    classifier,
    [text_input("text", [b"just one"])],
    outputs=[grpcclient.InferRequestedOutput("probabilities")],
)
out["only_probabilities"] = [o["name"] for o in only.get_response(as_json=True)["outputs"]]

out["errors"] = {
    "wrong_datatype": error(lambda: client.infer(classifier, [text_input("text", [1.0], "FP32")])),
    "missing_input": error(lambda: client.infer(classifier, [text_input("texts", [b"x"])])),
    "unknown_model": error(lambda: client.infer("no-such-model", [text_input("text", [b"x"])])),
    "empty_text": error(lambda: client.infer(classifier, [text_input("text", [b"ok", b""])])),
    "stream_on_unary": error(
        lambda: client.infer(
            generator,
            [text_input("text_input", [prompt.encode()]), text_input("stream", [True], "BOOL")],
        )
    ),
    "load": error(lambda: client.load_model(classifier)),
}

# Streamed generation: one response per text chunk, then Triton's empty final response.
sampling = json.dumps({"temperature": 0.9, "top_k": 20, "max_tokens": 12, "seed": int(seed)})
events = queue.Queue()
client.start_stream(callback=lambda result, error: events.put((result, error)))
client.async_stream_infer(
    generator,
    [
        text_input("text_input", [prompt.encode()]),
        text_input("stream", [True], "BOOL"),
        text_input("sampling_parameters", [sampling.encode()]),
    ],
    request_id="gen-1",
    enable_empty_final_response=True,
)
chunks, finish = [], None
while True:
    result, err = events.get(timeout=60)
    if err is not None:
        chunks.append({"error": str(err)})
        break
    response = result.get_response()
    params = response.parameters
    if "finish_reason" in params:
        finish = params["finish_reason"].string_param
    if params["triton_final_response"].bool_param:
        break
    chunks.append(b"".join(result.as_numpy("text_output")).decode())
# A bad request inside the stream answers an error; the stream goes on.
client.async_stream_infer(
    generator,
    [
        text_input("text_input", [prompt.encode()]),
        text_input("sampling_parameters", [b'{"temperature": -1}']),
    ],
    request_id="gen-bad",
)
_, stream_error = events.get(timeout=60)
client.async_stream_infer(
    generator,
    [
        text_input("text_input", [prompt.encode()]),
        text_input("sampling_parameters", [sampling.encode()]),
        text_input("exclude_input_in_output", [True], "BOOL"),
    ],
    request_id="gen-2",
)
whole, _ = events.get(timeout=60)
client.stop_stream()
out["stream"] = {
    "chunks": chunks,
    "finish_reason": finish,
    "error": None if stream_error is None else stream_error.message(),
    "whole": b"".join(whole.as_numpy("text_output")).decode(),
    "whole_id": whole.get_response().id,
}
unary = client.infer(
    generator,
    [
        text_input("text_input", [prompt.encode()]),
        text_input("sampling_parameters", [sampling.encode()]),
    ],
)
out["unary_generate"] = b"".join(unary.as_numpy("text_output")).decode()
client.close()
print(json.dumps(out))

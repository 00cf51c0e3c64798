"""Classify and stream from headrace with Triton's own client: tritonclient.grpc and numpy only.

    pip install "tritonclient[grpc]" numpy
    python examples/tritonclient_demo.py --url 127.0.0.1:50051          # the demo models
    python examples/tritonclient_demo.py --classifier NAME --generator NAME --json

headrace speaks the Open Inference Protocol (KServe v2) on its gRPC port, so a
client written for Triton or KServe works unchanged. Tensors: docs/serving.md.
"""

import argparse
import json
import queue

import numpy as np
import tritonclient.grpc as grpcclient

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--url", default="127.0.0.1:50051")
p.add_argument("--classifier", default="sentiment")
p.add_argument("--generator", default="tweetgpt")
p.add_argument("--prompt", default="Just landed in")
p.add_argument("--json", action="store_true", help="print one JSON object")
a = p.parse_args()
client = grpcclient.InferenceServerClient(a.url)


def strings(name, values):
    tensor = grpcclient.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object))
    return tensor


# Classify: `text` BYTES [-1] in; `label` BYTES and `probabilities` FP32 [-1, num_labels] out.
texts = ["I love this new phone!", "Worst service ever, never again.", "The bus comes at 9."]
result = client.infer(a.classifier, [strings("text", texts)])
probs = result.as_numpy("probabilities")
order = json.loads(result.get_output("probabilities").parameters["labels"].string_param)
rows = [
    {"text": t, "label": lab.decode(), "scores": dict(zip(order, map(float, row), strict=True))}
    for t, lab, row in zip(texts, result.as_numpy("label"), probs, strict=True)
]

# Stream: Triton's vLLM-backend tensors; one response per text chunk.
flag = grpcclient.InferInput("stream", [1], "BOOL")
flag.set_data_from_numpy(np.array([True]))
sampling = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 32, "seed": 1}
inputs = [
    strings("text_input", [a.prompt]),
    flag,
    strings("sampling_parameters", [json.dumps(sampling)]),
]
events = queue.Queue()
client.start_stream(callback=lambda result, error: events.put((result, error)))
client.async_stream_infer(a.generator, inputs, enable_empty_final_response=True)
chunks = []
while True:
    result, error = events.get(timeout=120)
    if error is not None:
        raise error
    response = result.get_response()
    if response.parameters["triton_final_response"].bool_param:
        break
    chunks.append(b"".join(result.as_numpy("text_output")).decode())
    if not a.json:
        print(chunks[-1], end="", flush=True)
client.stop_stream()
client.close()

if a.json:
    print(
        json.dumps({"classify": rows, "stream": {"chunks": len(chunks), "text": "".join(chunks)}})
    )
else:
    print(f"\n-- streamed {len(chunks)} chunks from {a.generator!r}, prompt {a.prompt!r}")
    for r in rows:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items())
        print(f"{r['label']:>9}  ({scores})  {r['text']}")

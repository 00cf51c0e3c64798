"""The transport floor: a bare grpc.aio server that answers Classify with a canned response.

GenerateStream streams `max_new_tokens` canned one-token chunks (`stream_interval`
tokens per chunk when set), as fast as the transport takes them: the streaming floor.

    python -m bench.bare_server --port 50090 [--labels 3]
    python -m bench.bare_server --port 50090 --reject    # every call RESOURCE_EXHAUSTED

No model, no batching, no logging, no metrics: the request is parsed and one prebuilt
`ClassifyResponse` (shaped like headrace's answer for one text) is returned. The same
load generator drives it and headrace, so calls/s and p50 here are what a Python
grpc.aio server on this box can do at all; headrace's figures are read against it.
With `--reject` every call is refused with RESOURCE_EXHAUSTED and a `retry-after-ms`
trailer instead: the floor of a refusal (bench/overload.py reads headrace's against it).
uvloop when installed and the transport's channel arguments (server/transport.py), as
`headrace serve`: without them, grpc core cancels calls of a burst past 1,000 pending.
"""

from __future__ import annotations

import argparse
from typing import Any

import grpc
from headrace.server.transport import server_options
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pbg

from bench.common import run_loop


def canned(labels: int) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        model="sentiment",
        model_version="1",
        results=[
            pb.Classification(
                labels=[pb.Label(name=f"label{i}", score=1.0 / (i + 2)) for i in range(labels)]
            )
        ],
        request_id="0123456789abcdef0123456789abcdef",
        usage=pb.Usage(prompt_tokens=16),
    )


REJECT_TRAILERS = (("retry-after-ms", "10"),)


class Bare(pbg.InferenceServicer):
    def __init__(self, labels: int, initial_metadata: bool, reject: bool = False) -> None:
        self.response = canned(labels)
        self.initial_metadata = initial_metadata
        self.reject = reject

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        if self.reject:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the queue is full; retry later",
                trailing_metadata=REJECT_TRAILERS,
            )
        if self.initial_metadata:  # what one separate initial-metadata send costs
            await context.send_initial_metadata((("x-request-id", self.response.request_id),))
        return self.response


    async def GenerateStream(self, request: pb.GenerateRequest, context: Any) -> Any:
        n, per = max(1, request.max_new_tokens), max(1, request.stream_interval)
        for start in range(0, n, per):
            k = min(per, n - start)
            chunk = pb.GenerateChunk(
                text=" tok" * k,
                token_ids=[7] * k,
                request_id=self.response.request_id,
                token_times_us=[start + i for i in range(k)],
            )
            if start + k == n:
                chunk.finish_reason = pb.LENGTH
            yield chunk


async def serve(port: int, labels: int, initial_metadata: bool, reject: bool = False) -> None:
    server = grpc.aio.server(options=server_options(4 * 1024 * 1024))
    pbg.add_InferenceServicer_to_server(Bare(labels, initial_metadata, reject), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare server on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--labels", type=int, default=3)
    p.add_argument("--initial-metadata", action="store_true", help="send x-request-id first")
    p.add_argument("--reject", action="store_true", help="refuse every call (RESOURCE_EXHAUSTED)")
    a = p.parse_args(argv)
    run_loop(serve(a.port, a.labels, a.initial_metadata, a.reject))


if __name__ == "__main__":
    main()

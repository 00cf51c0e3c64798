"""The floor plus headrace's engine: grpc.aio, the real batcher and model, a canned answer.

    python -m bench.engine_server --port 50090 --models DIR --model sentiment \
        [--settings deploy/edge/headrace-edge.toml]

Between the transport floor (bench/bare_server.py) and `headrace serve`: the model is
loaded by headrace's own repository with the server's settings (threads, spinning,
batching from its manifest), and each Classify hands its texts to that model's
`EncoderBatcher.submit` (tokenized with their batch in the batcher's thread, one backend
call per length group), then returns a prebuilt `ClassifyResponse`. Nothing of the
service around it runs: no request checks, lease, conversion, log line or metrics.

So, in one run of bench/overhead.py, headrace's CPU per call minus this server's is what
the service layers cost per call, and this server's minus the floor's is what the engine
costs (the thread hop, tokenizing, padding, the backend).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import grpc
from headrace.server.app import Server
from headrace.server.config import load_config
from headrace.server.logs import configure_logging
from headrace.server.models import ClassifierModel
from headrace.server.transport import server_options
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pbg

from bench.bare_server import canned
from bench.common import run_loop


class EngineOnly(pbg.InferenceServicer):
    def __init__(self, model: ClassifierModel, labels: int) -> None:
        self.batcher = model.batcher
        self.response = canned(labels)

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        await self.batcher.submit(list(request.texts))
        return self.response


async def serve(port: int, models: Path, name: str, settings: Path | None) -> None:
    configure_logging("json", "warning")
    overrides = {"models": models, "metrics_port": 0, "poll_interval_s": 0.0}
    headrace = Server(load_config(settings, overrides))
    await headrace.repository.start()
    async with headrace.repository.lease(name, None, ClassifierModel) as lease:
        model, labels = lease.model, len(lease.manifest.labels)
    server = grpc.aio.server(options=server_options(4 * 1024 * 1024))
    pbg.add_InferenceServicer_to_server(EngineOnly(model, labels), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"engine server on 127.0.0.1:{port} ({name})", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await headrace.repository.stop(drain=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--models", type=Path, required=True, help="model repository")
    p.add_argument("--model", required=True, help="the classifier to serve")
    p.add_argument("--settings", type=Path, help="headrace settings TOML (threads, spinning)")
    a = p.parse_args(argv)
    run_loop(serve(a.port, a.models.resolve(), a.model, a.settings))


if __name__ == "__main__":
    main()

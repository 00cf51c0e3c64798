"""Serve a model repository with the edge profile in this process, call every RPC kind,
then report which heavy modules the process imported. Run as a script:

    python tests/edge/edge_probe.py MODELS_DIR   -> one JSON line on stdout

Imports only the standard library and headrace, so it runs in a torch-free virtualenv.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any


async def probe(models: Path) -> dict[str, Any]:
    import headrace.edge.ort_backend
    import headrace.server.cli
    import headrace.server.repository
    import headrace.server.service  # noqa: F401
    from headrace.client import AsyncClient
    from headrace.server.app import Server
    from headrace.server.cli import make_parser
    from headrace.server.config import ServerConfig

    make_parser()  # the `headrace serve` path builds the whole parser, `build` included
    config = ServerConfig(models=models, port=0, profile="edge", poll_interval_s=0.0)
    server = Server(config.validate())
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            infos = await client.models()
            classified = await client.classify(["edge boxes run the model", "ok"])
            generated = await client.generate("the service answered", max_new_tokens=6)
            chunks = [c async for c in client.stream("a cancelled call", max_new_tokens=6)]
    finally:
        await server.stop(0.5)
    return {
        "models": {m.name: [m.backend, m.precision, m.profile] for m in infos},
        "labels": [r.labels[0].name for r in classified.results],
        "generated_tokens": len(generated.token_ids),
        "streamed_tokens": sum(len(c.token_ids) for c in chunks),
    }


if __name__ == "__main__":
    result = asyncio.run(probe(Path(sys.argv[1])))
    result["heavy_modules"] = sorted(
        m for m in ("torch", "transformers", "tensorrt", "onnx") if m in sys.modules
    )
    result["build_modules"] = sorted(m for m in sys.modules if m.startswith("headrace.build"))
    print(json.dumps(result))

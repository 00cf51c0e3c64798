"""Per-request cost of Starlette vs FastAPI on uvicorn: why the HTTP front uses Starlette.

    # FastAPI is not a headrace dependency: measure in a scratch virtualenv
    uv venv /tmp/fa && uv pip install -p /tmp/fa/bin/python "fastapi<1" uvicorn httptools uvloop orjson
    /tmp/fa/bin/python bench/http_frameworks.py --seconds 5 --callers 8

The same tiny JSON endpoint (POST a body of texts, answer a small JSON object) is
served four ways, each in its own child process on uvicorn + httptools + uvloop:

    starlette          a Starlette Route, orjson in and out
    fastapi-request    FastAPI, the handler takes the raw Request (no validation)
    fastapi-pydantic   FastAPI with a pydantic request model (its usual way)
    raw-asgi           a bare ASGI callable: the floor uvicorn allows

A closed-loop client (keep-alive connections, pre-built request bytes) drives each
one after the other; the figure that matters is the server's CPU time per request
(user + system from /proc), which is what a framework adds to every call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

BODY = json.dumps({"model": "m", "texts": ["the service answered quickly"], "top_k": 2}).encode()
REQUEST = (
    b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


def app_for(kind: str) -> Any:
    import orjson

    answer = {"object": "classification", "results": [{"labels": [{"name": "x", "score": 1.0}]}]}
    if kind == "raw-asgi":

        async def raw(scope, receive, send):
            body = b""
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
            orjson.loads(body)
            out = orjson.dumps(answer)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(out)).encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": out})

        return raw
    if kind == "starlette":
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route, Router

        async def classify(request: Request) -> Response:
            orjson.loads(await request.body())
            return Response(orjson.dumps(answer), media_type="application/json")

        return Router([Route("/v1/classify", classify, methods=["POST"])])
    from fastapi import FastAPI, Request
    from fastapi.responses import ORJSONResponse

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    if kind == "fastapi-request":

        @app.post("/v1/classify")
        async def classify_raw(request: Request) -> ORJSONResponse:
            orjson.loads(await request.body())
            return ORJSONResponse(answer)

        return app
    from pydantic import BaseModel

    class Body(BaseModel):
        model: str = ""
        texts: list[str]
        top_k: int = 0

    @app.post("/v1/classify")
    async def classify_model(body: Body) -> ORJSONResponse:
        return ORJSONResponse(answer)

    return app


def serve(kind: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        app_for(kind), host="127.0.0.1", port=port, http="httptools", loop="uvloop",
        log_level="warning", access_log=False, lifespan="off",
    )  # fmt: skip


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, callers: int, seconds: float, pid: int) -> dict[str, float]:
    done = 0
    stop_at = 0.0

    async def caller() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop_at:
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            done += 1
        writer.close()

    stop_at = time.perf_counter() + 1.0  # warm-up
    await asyncio.gather(*(caller() for _ in range(callers)))
    done = 0
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(caller() for _ in range(callers)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
    return {"requests_per_s": done / wall, "server_cpu_us_per_request": 1e6 * cpu / max(done, 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--callers", type=int, default=8)
    p.add_argument("--kinds", default="raw-asgi,starlette,fastapi-request,fastapi-pydantic")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        serve(a.serve, a.port)
        return
    import uvloop

    for kind in a.kinds.split(","):
        port = free_port()
        child = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)])
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            r = uvloop.run(drive(port, a.callers, a.seconds, child.pid))
            print(
                f"{kind:18s} {r['requests_per_s']:8.0f} req/s  "
                f"server {r['server_cpu_us_per_request']:6.0f} us CPU/request",
                flush=True,
            )
        finally:
            child.terminate()
            child.wait(10)


if __name__ == "__main__":
    main()

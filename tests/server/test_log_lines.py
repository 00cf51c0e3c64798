"""Log lines stay whole when processes share one piped stderr (`--workers N`, their
engine): each line leaves in one write, the per-RPC lines in writes of whole lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

WRITER = r"""
import asyncio, sys
from headrace.server.logs import configure_logging, get_logger, rpc_line
configure_logging("json", "info")
log = get_logger("headrace.test")
tag = sys.argv[1]
pad = "x" * 300
for i in range(1500):
    log.info("model_version_ready", model=tag, i=i, pad=pad)

async def rpcs():
    for turn in range(60):
        for i in range(25):  # 25 lines of ~400 bytes in one loop turn: past one pipe write
            rpc_line(log, {"rpc": "Classify", "request_id": f"{tag}-{turn}-{i}", "pad": pad})
        await asyncio.sleep(0)
asyncio.run(rpcs())
"""


def test_lines_of_processes_sharing_a_pipe_stay_whole() -> None:
    read, write = os.pipe()
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, tag], stderr=write)
        for tag in ("a", "b", "c")
    ]
    os.close(write)
    with open(read, "rb") as pipe:
        data = pipe.read()
    for p in procs:
        assert p.wait(60) == 0
    lines = data.decode().splitlines()
    parsed = [json.loads(line) for line in lines]  # a line broken by another's fails here
    for tag in ("a", "b", "c"):
        assert sum(1 for e in parsed if e.get("model") == tag) == 1500
        assert sum(1 for e in parsed if str(e.get("request_id", "")).startswith(f"{tag}-")) == 1500

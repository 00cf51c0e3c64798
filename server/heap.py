"""The garbage collector and a serving process: what startup loaded, frozen out of its scans.

By the time a server answers, its heap holds what lives as long as the process: modules,
protobuf descriptors, the tokenizers' and backends' Python objects, gRPC's. Python's
full (generation 2) collections scan all of it: on the 2-core development machine, with
the tiny models, one took ~30 ms on the event loop (5 of them in 9 s of Classify at 64
callers), a stall every call in flight waits out. `gc.freeze()` moves every object
alive at that moment to a permanent generation that no collection visits; what calls
allocate afterwards is collected as before. A version loaded later (hot reload) is not
frozen: its objects are scanned like any others. A version loaded at startup and retired
later keeps what only reference cycles held of it (its backend's session and arrays are
freed by its `close`, not by the collector): at most once per startup version, however
many reloads follow. Done by the serving processes
(`server/app.py: serve`, the engine process), not by `Server.start`: a process that
embeds a server keeps its heap its own.
"""

from __future__ import annotations

import gc
import time

from headrace.server.logs import get_logger

log = get_logger("headrace.heap")


def freeze_startup_heap() -> int:
    """Collect once (nothing dead gets frozen), then freeze what is left -> objects frozen."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("heap_frozen", objects=frozen, ms=round(1e3 * (time.perf_counter() - t0), 1))
    return frozen

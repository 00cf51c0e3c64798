"""CUDA graphs for the decode step of `TorchDecoder`.

A decode step of a small model is dominated by kernel launches. One graph is captured
per (batch bucket, key-length bucket): the batch is padded to the bucket with rows
that write to the cache's scratch row and column (never read by a real row), and keys
are read up to the length bucket, so a short sequence does not pay for a long context.
Inputs are copied into static buffers before each replay (one [3, B] int64 copy);
the logits come back in the graph's static output and are valid until the next replay.

Graphs are captured lazily at the first step that needs one, or all at once by
`capture()` at load time (the server's warm-up), in one shared memory pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from headrace.server.backends.torch_cache import Plan

if TYPE_CHECKING:
    from headrace.server.backends.torch_backend import TorchDecoder

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_KV_BUCKET = 64


def kv_buckets(max_context: int) -> list[int]:
    """Key lengths 64, 128, ... doubling up to max_context + 1 (the scratch column)."""
    out, n = [], MIN_KV_BUCKET
    while n < max_context + 1:
        out.append(n)
        n *= 2
    out.append(max_context + 1)
    return out


class _Graph:
    def __init__(self, batch: int, kv_len: int, device: torch.device) -> None:
        self.batch = batch
        self.kv_len = kv_len
        self.inputs = torch.zeros((3, batch), dtype=torch.long, device=device)  # ids, rows, pos
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None  # [B, V], static output


class DecodeGraphs:
    def __init__(self, decoder: TorchDecoder, batch_buckets: Sequence[int] | None = None) -> None:
        self.dec = decoder
        wanted = batch_buckets or DEFAULT_BATCH_BUCKETS
        self.batch_buckets = sorted({b for b in wanted if b <= decoder.max_slots})
        if not self.batch_buckets or self.batch_buckets[-1] < decoder.max_slots:
            self.batch_buckets.append(decoder.max_slots)
        self.kv_buckets = kv_buckets(decoder.max_context)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool: Any = None
        self._host = torch.zeros((3, self.batch_buckets[-1]), dtype=torch.long).pin_memory()
        self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call] # the pinned buffer is free once this has passed

    def fits(self, n: int) -> bool:
        return n <= self.batch_buckets[-1]

    def _bucket(self, buckets: Sequence[int], n: int) -> int:
        return next(b for b in buckets if b >= n)

    def _forward(self, g: _Graph) -> torch.Tensor:
        dec = self.dec
        plan = Plan(rows=g.inputs[1], write_pos=g.inputs[2][:, None], kv_len=g.kv_len, start=None)
        logits: torch.Tensor = dec._run(g.inputs[0][:, None], plan, logits_to_keep=1)[:, -1]
        return logits

    def _capture_one(self, batch: int, kv_len: int) -> _Graph:
        dec = self.dec
        g = _Graph(batch, kv_len, dec.device_t)
        cache = dec.cache
        g.inputs[1].fill_(cache.scratch_row)
        g.inputs[2].fill_(cache.scratch_col)
        side = torch.cuda.Stream(device=dec.device_t)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(dec.device_t))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (allocator, cuBLAS handles)
                self._forward(g)
        torch.cuda.current_stream(dec.device_t).wait_stream(side)
        with torch.inference_mode(), torch.cuda.graph(g.graph, pool=self.pool):
            g.logits = self._forward(g)
        if self.pool is None:
            self.pool = g.graph.pool()
        self.graphs[(batch, kv_len)] = g
        return g

    def capture(self) -> None:
        """Capture every (batch, key length) bucket now."""
        for b in self.batch_buckets:
            for k in self.kv_buckets:
                if (b, k) not in self.graphs:
                    self._capture_one(b, k)

    def replay(
        self, slots: Sequence[int], last_tokens: Sequence[int], positions: Sequence[int]
    ) -> torch.Tensor:
        n = len(slots)
        batch = self._bucket(self.batch_buckets, n)
        kv_len = self._bucket(self.kv_buckets, max(positions) + 1)
        g = self.graphs.get((batch, kv_len)) or self._capture_one(batch, kv_len)
        self._copied.synchronize()
        host = self._host[:, :batch]
        host[0, :n] = torch.as_tensor(list(last_tokens))
        host[1, :n] = torch.as_tensor(list(slots))
        host[2, :n] = torch.as_tensor(list(positions))
        host[0, n:] = 0
        host[1, n:] = self.dec.cache.scratch_row
        host[2, n:] = self.dec.cache.scratch_col
        g.inputs.copy_(host, non_blocking=True)
        self._copied.record()
        g.graph.replay()
        assert g.logits is not None
        return g.logits[:n]  # [N, V]; valid until the next replay

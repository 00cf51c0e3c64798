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
# Other models' worker threads keep using the GPU while one backend captures (a new
# version loading beside a serving one): restrict only the capturing thread.
CAPTURE_MODE = "thread_local"


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
        with (
            torch.inference_mode(),
            torch.cuda.graph(g.graph, pool=self.pool, capture_error_mode=CAPTURE_MODE),
        ):
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


class EncoderGraphs:
    """CUDA graphs of the encoder forward, one per (batch bucket, length rounded up to 32).

    A small encoder on a large GPU is bound by kernel launches (the forward takes the same
    time for 1 or 256 texts, docs/datacenter.md); a replayed graph launches once. Padding
    rows and columns are masked; the logits of real rows are copied out before return.
    Larger batches or longer texts than the buckets fall back to eager.
    """

    SEQ_ALIGN = 32

    def __init__(self, encoder: Any, max_batch: int, max_seq: int) -> None:
        self.enc = encoder
        self.batch_buckets = [b for b in DEFAULT_BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.max_seq = max_seq
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool: Any = None

    def fits(self, batch: int, seq: int) -> bool:
        return batch <= self.batch_buckets[-1] and seq <= self.max_seq

    def _forward(self, g: _Graph) -> torch.Tensor:
        enc = self.enc
        ids, mask = g.inputs[0], g.inputs[1]  # [B, S] each
        # additive mask [B, 1, 1, S]: 0 where attended, the dtype's minimum on padding
        add = (1 - mask[:, None, None, :]).to(enc.dtype) * torch.finfo(enc.dtype).min
        logits: torch.Tensor = enc.model(input_ids=ids, attention_mask=add).logits
        return logits

    def _capture(self, batch: int, seq: int) -> _Graph:
        dev = self.enc.device_t
        g = _Graph(batch, seq, dev)
        g.inputs = torch.zeros((2, batch, seq), dtype=torch.long, device=dev)  # ids, mask
        g.inputs[1, :, 0] = 1
        side = torch.cuda.Stream(device=dev)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):
                self._forward(g)
        torch.cuda.current_stream(dev).wait_stream(side)
        with (
            torch.inference_mode(),
            torch.cuda.graph(g.graph, pool=self.pool, capture_error_mode=CAPTURE_MODE),
        ):
            g.logits = self._forward(g)
        if self.pool is None:
            self.pool = g.graph.pool()
        self.graphs[(batch, seq)] = g
        return g

    def run(self, input_ids: Any, attention_mask: Any) -> Any:
        """int64 numpy [b, s] each -> float32 numpy logits [b, labels]."""
        b, s = input_ids.shape
        batch = next(x for x in self.batch_buckets if x >= b)
        seq = min(-(-s // self.SEQ_ALIGN) * self.SEQ_ALIGN, self.max_seq)
        g = self.graphs.get((batch, seq)) or self._capture(batch, seq)
        host = torch.zeros((2, batch, seq), dtype=torch.long)
        host[0, :b, :s] = torch.from_numpy(input_ids)
        host[1, :b, :s] = torch.from_numpy(attention_mask)
        host[1, b:, 0] = 1  # padding rows attend to one column: no all-masked row
        g.inputs.copy_(host)
        g.graph.replay()
        assert g.logits is not None
        return g.logits[:b].float().cpu().numpy()

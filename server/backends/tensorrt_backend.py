"""The TensorRT backend: serialized engines (from `headrace build engine`) on one NVIDIA GPU.

Written against the TensorRT 10 Python API: `Runtime.deserialize_cuda_engine`, one
`IExecutionContext` per optimisation profile, `set_input_shape` / `set_tensor_address` /
`execute_async_v3` on the backend's own CUDA stream. Device buffers are torch CUDA
tensors, so logits stay on the GPU and the torch sampler picks tokens there.

- `TrtEncoder`: input_ids, attention_mask [B, S] -> logits [B, labels]. The engine holds
  one profile per batch bucket; a call runs on the smallest profile that fits (larger
  batches are split).
- `TrtDecoder`: the KV-cache decoder graph of build/export.py (input_ids, attention_mask,
  position_ids, past_key_values.{i}.key/value -> logits [B, V] of the last position,
  present.{i}.key/value). Each slot's keys/values live in one static buffer
  [layers, max_slots, heads, max_context, head_dim]; a decode step gathers the slots'
  pasts up to the longest one (shorter rows masked by attention_mask), runs the engine
  once, and writes each row's new key/value back at that row's own position.
  Profile 0 serves prefill (batch 1, past 0), profile 1 decode (past >= 1).

tensorrt and torch are imported here only; without them, or without CUDA, the
constructors raise BackendUnavailable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from headrace.server.backends.base import BackendSpec, BackendUnavailable
from headrace.server.types import SamplingParams


def _import_runtime() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
        import torch
    except ImportError as exc:
        raise BackendUnavailable(f"the tensorrt backend needs tensorrt and torch: {exc}") from exc
    if not hasattr(trt, "Runtime"):  # e.g. only a stubs-only `tensorrt` folder is installed
        raise BackendUnavailable("the installed `tensorrt` package has no runtime (stubs only?)")
    if not torch.cuda.is_available():
        raise BackendUnavailable("the tensorrt backend needs an NVIDIA GPU with CUDA")
    return trt, torch


def _torch_dtype(trt: Any, torch: Any, dtype: Any) -> Any:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.INT8: torch.int8,
    }
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dtype]


@dataclass
class _Profile:
    index: int
    context: Any  # IExecutionContext bound to this profile
    ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # input -> (min, max) shape

    def fits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        for name, shape in shapes.items():
            lo, hi = self.ranges[name]
            if any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
                return False
        return True


class _Engine:
    """One deserialized engine, a context per profile, and a stream."""

    def __init__(self, path: Path, device: str) -> None:
        trt, torch = _import_runtime()
        self.trt, self.torch = trt, torch
        self.device = torch.device(device if ":" in device else "cuda:0")
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise BackendUnavailable(
                f"TensorRT could not load {Path(path).name} (built for another GPU or version?)"
            )
        self.engine = engine
        self.stream = torch.cuda.Stream(device=self.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, torch, engine.get_tensor_dtype(n)) for n in names}
        self.profiles: list[_Profile] = []
        for p in range(engine.num_optimization_profiles):
            ctx = engine.create_execution_context()
            ctx.set_optimization_profile_async(p, self.stream.cuda_stream)
            ranges = {}
            for n in self.inputs:
                lo, _, hi = engine.get_tensor_profile_shape(n, p)
                ranges[n] = (tuple(lo), tuple(hi))
            self.profiles.append(_Profile(p, ctx, ranges))
        self.stream.synchronize()
        # a valid address for zero-sized inputs (an empty past at prefill)
        self._dummy = torch.zeros(16, dtype=torch.uint8, device=self.device)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.engine.get_tensor_shape(name))

    def profile_for(self, shapes: dict[str, tuple[int, ...]]) -> _Profile:
        for prof in self.profiles:
            if prof.fits(shapes):
                return prof
        raise ValueError(f"no optimisation profile of the engine fits the shapes {shapes}")

    def run(self, prof: _Profile, feeds: dict[str, Any]) -> dict[str, Any]:
        """feeds: name -> contiguous CUDA tensor of the engine's dtype -> outputs by name.
        Call inside `torch.cuda.stream(self.stream)`; results are ready on that stream."""
        ctx, torch = prof.context, self.torch
        for name in self.inputs:
            t = feeds[name]
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            outs[name] = t
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return outs


class TrtEncoder:
    """input_ids, attention_mask int64 [B, S] -> float32 logits [B, labels] (numpy)."""

    name = "tensorrt"

    def __init__(self, spec: BackendSpec) -> None:
        self.eng = _Engine(spec.path, spec.device)
        art = spec.manifest.artifact("tensorrt")
        self.precision = art.precision if art is not None else spec.precision
        self.device = str(self.eng.device)
        self.max_batch = max(p.ranges["input_ids"][1][0] for p in self.eng.profiles)
        self.max_seq = max(p.ranges["input_ids"][1][1] for p in self.eng.profiles)
        for prof in self.eng.profiles:  # warm-up: every profile at its largest batch
            hi_b, _ = prof.ranges["input_ids"][1]
            ids = np.zeros((hi_b, min(16, self.max_seq)), dtype=np.int64)
            self.forward(ids, np.ones_like(ids))

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self.eng.torch
        b, s = input_ids.shape
        if s > self.max_seq:
            raise ValueError(f"{s} tokens: the engine was built for at most {self.max_seq}")
        chunks = []
        with torch.cuda.stream(self.eng.stream):
            for lo in range(0, b, self.max_batch):
                ids = input_ids[lo : lo + self.max_batch]
                mask = attention_mask[lo : lo + self.max_batch]
                feeds = {
                    "input_ids": self._to_device(ids, "input_ids"),
                    "attention_mask": self._to_device(mask, "attention_mask"),
                }
                prof = self.eng.profile_for({k: tuple(v.shape) for k, v in feeds.items()})
                chunks.append(self.eng.run(prof, feeds)["logits"].float())
            logits = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            out: np.ndarray = logits.cpu().numpy()  # synchronises the stream
        return out

    def _to_device(self, arr: np.ndarray, name: str) -> Any:
        torch = self.eng.torch
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
        return t.to(self.eng.device).to(self.eng.dtypes[name])

    def close(self) -> None:
        self.eng.profiles.clear()
        del self.eng


class TrtDecoder:
    """A KV-cache decoder engine serving `max_slots` sequences (see the module docstring)."""

    name = "tensorrt"

    def __init__(self, spec: BackendSpec) -> None:
        eng = self.eng = _Engine(spec.path, spec.device)
        torch = eng.torch
        art = spec.manifest.artifact("tensorrt")
        extra = art.extra if art is not None else {}
        self.precision = art.precision if art is not None else spec.precision
        self.device = str(eng.device)
        self.num_layers = sum(1 for n in eng.inputs if n.startswith("past_key_values."))
        self.num_layers //= 2
        _, heads, _, head_dim = eng.tensor_shape("past_key_values.0.key")
        self.vocab_size = int(eng.tensor_shape("logits")[-1])
        decode_hi = max(p.ranges["past_key_values.0.key"][1][2] for p in eng.profiles)
        self.max_context = int(extra.get("max_context") or decode_hi + 1)
        self.max_context = min(self.max_context, spec.manifest.generation.max_context)
        self.max_slots = int(spec.max_slots)
        self.max_batch = max(p.ranges["input_ids"][1][0] for p in eng.profiles)
        kv_dtype = eng.dtypes["past_key_values.0.key"]
        shape = (self.num_layers, self.max_slots, heads, self.max_context, head_dim)
        # [layers, slots, heads, context, head_dim], keys and values
        self.keys = torch.zeros(shape, dtype=kv_dtype, device=eng.device)
        self.values = torch.zeros(shape, dtype=kv_dtype, device=eng.device)
        self.lengths = [0] * self.max_slots
        self._heads, self._head_dim = int(heads), int(head_dim)
        self.prefill(0, [0])  # warm-up both profiles
        self.decode([0], [0])
        self.release(0)

    def _feeds(self, ids: Any, mask: Any, pos: Any, pasts: list[tuple[Any, Any]]) -> dict[str, Any]:
        eng = self.eng
        feeds = {
            "input_ids": ids.to(eng.dtypes["input_ids"]),
            "attention_mask": mask.to(eng.dtypes["attention_mask"]),
            "position_ids": pos.to(eng.dtypes["position_ids"]),
        }
        for i, (k, v) in enumerate(pasts):
            feeds[f"past_key_values.{i}.key"] = k.contiguous()
            feeds[f"past_key_values.{i}.value"] = v.contiguous()
        return feeds

    def prefill(self, slot: int, token_ids: Sequence[int]) -> Any:
        torch, eng = self.eng.torch, self.eng
        n = len(token_ids)
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.max_slots})")
        if not 0 < n <= self.max_context:
            raise ValueError(f"prompt of {n} tokens does not fit a context of {self.max_context}")
        dev, kv = eng.device, self.keys.dtype
        with torch.cuda.stream(eng.stream):
            ids = torch.tensor([list(token_ids)], dtype=torch.int64, device=dev)
            empty = torch.zeros((1, self._heads, 0, self._head_dim), dtype=kv, device=dev)
            feeds = self._feeds(
                ids,
                torch.ones_like(ids),
                torch.arange(n, device=dev)[None, :],
                [(empty, empty)] * self.num_layers,
            )
            prof = eng.profile_for({k: tuple(v.shape) for k, v in feeds.items()})
            outs = eng.run(prof, feeds)
            for i in range(self.num_layers):
                # present: [1, heads, n, head_dim]
                self.keys[i, slot, :, :n] = outs[f"present.{i}.key"][0]
                self.values[i, slot, :, :n] = outs[f"present.{i}.value"][0]
        self.lengths[slot] = n
        return outs["logits"][0]  # [V], on the GPU

    def decode(self, slots: Sequence[int], last_tokens: Sequence[int]) -> Any:
        torch = self.eng.torch
        if len(slots) != len(last_tokens) or not slots:
            raise ValueError("decode needs one last token per slot, and at least one slot")
        for s in slots:
            if not 0 <= s < self.max_slots or self.lengths[s] == 0:
                raise ValueError(f"slot {s} holds no sequence (prefill it first)")
            if self.lengths[s] >= self.max_context:
                raise ValueError(f"slot {s} is full ({self.max_context} tokens)")
        parts = []
        with torch.cuda.stream(self.eng.stream):
            for lo in range(0, len(slots), self.max_batch):
                parts.append(
                    self._decode_chunk(
                        slots[lo : lo + self.max_batch], last_tokens[lo : lo + self.max_batch]
                    )
                )
        for s in slots:
            self.lengths[s] += 1
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _decode_chunk(self, slots: Sequence[int], last_tokens: Sequence[int]) -> Any:
        torch, eng = self.eng.torch, self.eng
        dev = eng.device
        lengths = [self.lengths[s] for s in slots]
        past = max(lengths)
        host = torch.tensor([list(last_tokens), list(slots), lengths], dtype=torch.int64)
        ids_t, rows, lens = host.to(dev)  # one small copy: tokens, slots, lengths
        cols = torch.arange(past + 1, device=dev)
        # attention_mask [N, past + 1]: each row's own past, padding 0, the new token 1
        mask = (cols[None, :] < lens[:, None]) | (cols[None, :] == past)
        pasts = [
            (self.keys[i, :, :, :past].index_select(0, rows),
             self.values[i, :, :, :past].index_select(0, rows))
            for i in range(self.num_layers)
        ]  # fmt: skip
        feeds = self._feeds(ids_t[:, None], mask, lens[:, None], pasts)
        prof = eng.profile_for({k: tuple(v.shape) for k, v in feeds.items()})
        outs = eng.run(prof, feeds)
        for i in range(self.num_layers):
            # present [N, heads, past + 1, head_dim]: the new key/value is the last column
            self.keys[i, rows, :, lens] = outs[f"present.{i}.key"][:, :, past]
            self.values[i, rows, :, lens] = outs[f"present.{i}.value"][:, :, past]
        return outs["logits"]  # [N, V]

    def sample(
        self,
        logits: Any,
        params: Sequence[SamplingParams],
        generators: Sequence[np.random.Generator | None],
        histories: Sequence[Sequence[int]],
    ) -> list[int]:
        from headrace.server.backends.torch_sampling import sample_torch

        torch = self.eng.torch
        current = torch.cuda.current_stream(self.eng.device)
        current.wait_stream(self.eng.stream)  # no host sync: the sampler queues behind the engine
        logits.record_stream(current)
        chosen: list[int] = sample_torch(logits, params, generators, histories)
        return chosen

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def close(self) -> None:
        self.eng.profiles.clear()
        del self.keys, self.values, self.eng

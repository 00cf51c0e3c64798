"""The torch backend: Hugging Face checkpoints on CPU or CUDA, the numerical reference.

`TorchEncoder` runs an `AutoModelForSequenceClassification`; `TorchDecoder` runs an
`AutoModelForCausalLM` over a static slot KV cache (server/backends/torch_cache.py),
so the decoder scheduler can prefill one slot and decode any set of slots in one
forward. On CUDA the model runs in fp16/bf16 as the spec asks, sampling stays on the
GPU (server/backends/torch_sampling.py) and a decode step can replay a CUDA graph
per batch and key-length bucket (`options={"cuda_graphs": false}` turns that off).

torch and transformers are imported here and nowhere in `headrace.server`'s import path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from headrace.server.backends.base import BackendSpec, BackendUnavailable
from headrace.server.backends.sampling_numpy import sample_numpy
from headrace.server.backends.torch_cache import Plan, SlotCache, cache_keyword
from headrace.server.types import SamplingParams

KV_ALIGN = 64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    try:
        dtype = DTYPES[precision]
    except KeyError:
        raise BackendUnavailable(
            f"torch backend serves fp32, fp16 or bf16, not {precision!r}"
        ) from None
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32  # fp16 matmuls on CPU are slow and inexact: serve fp32
    return dtype


def _attention_kernels(device: torch.device) -> Any:
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # not cuDNN: it plans anew for every new sequence length (~70 ms per decode step, 50-130
    # ms per first classify shape, measured on an H100); the memory-efficient kernel takes
    # an additive mask as-is
    return sdpa_kernel(
        [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    )


def _set_threads(spec: BackendSpec) -> None:
    threads = spec.options.get("intra_op_threads")
    if threads:
        torch.set_num_threads(int(threads))


def _load(auto_cls: Any, spec: BackendSpec, dtype: torch.dtype, device: torch.device) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only, never the hub
    from transformers.utils import logging as hf_logging

    # a server's log is lines one can grep, not tqdm bars
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model = auto_cls.from_pretrained(
        str(spec.path), dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    return model.to(device).eval()


class TorchEncoder:
    """input_ids, attention_mask int64 [B, S] -> float32 logits [B, labels] (numpy)."""

    name = "torch"

    def __init__(self, spec: BackendSpec) -> None:
        from transformers import AutoModelForSequenceClassification

        _set_threads(spec)
        self.device_t = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.precision, self.device_t)
        self.device = str(self.device_t)
        self.precision = {v: k for k, v in DTYPES.items()}[self.dtype]
        self.model = _load(AutoModelForSequenceClassification, spec, self.dtype, self.device_t)
        self.num_labels = int(self.model.config.num_labels)
        self.graphs: Any = None
        if spec.options.get("cuda_graphs", True) and self.device_t.type == "cuda":
            from headrace.server.backends.torch_graphs import EncoderGraphs

            config = self.model.config
            max_seq = int(getattr(config, "max_position_embeddings", 512))
            max_batch = int(spec.options.get("graph_max_batch") or spec.manifest.batching.max_batch)
            self.graphs = EncoderGraphs(self, max_batch, max_seq)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if self.graphs is not None and self.graphs.fits(*input_ids.shape):
            with _attention_kernels(self.device_t):
                graphed: np.ndarray = self.graphs.run(input_ids, attention_mask)
            return graphed
        ids, mask = torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
        with torch.inference_mode(), _attention_kernels(self.device_t):
            # plain copies: pinning a fresh host buffer per call costs more than it saves
            ids, mask = ids.to(self.device_t), mask.to(self.device_t)
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # [B, labels]
            result: np.ndarray = logits.float().cpu().numpy()
            return result

    def close(self) -> None:
        self.graphs = None
        del self.model
        if self.device_t.type == "cuda":
            torch.cuda.empty_cache()


def _max_context(config: Any, spec: BackendSpec) -> int:
    limits = [
        getattr(config, name)
        for name in ("n_positions", "max_position_embeddings")
        if isinstance(getattr(config, name, None), int)
    ]
    wanted = spec.options.get("max_context") or spec.manifest.generation.max_context
    if wanted:
        limits.append(int(wanted))
    if not limits:
        raise BackendUnavailable("cannot tell the model's context length from its config")
    return int(min(limits))


class TorchDecoder:
    """A causal LM over a static KV cache of `max_slots` sequences.

    prefill(slot, ids) -> logits [V]; decode(slots, last) -> logits [N, V]; both stay on
    the model's device as torch tensors and `sample` picks tokens there.
    """

    name = "torch"

    def __init__(self, spec: BackendSpec) -> None:
        from transformers import AutoModelForCausalLM

        _set_threads(spec)
        self.device_t = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.precision, self.device_t)
        self.device = str(self.device_t)
        self.precision = {v: k for k, v in DTYPES.items()}[self.dtype]
        self.model = _load(AutoModelForCausalLM, spec, self.dtype, self.device_t)
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.max_context = _max_context(config, spec)
        self.max_slots = int(spec.max_slots)
        self.cache = SlotCache(
            num_layers=int(config.num_hidden_layers),
            max_slots=self.max_slots,
            max_context=self.max_context,
            dtype=self.dtype,
            device=self.device_t,
        )
        self._cache_kw = cache_keyword(self.model)
        self.lengths = [0] * self.max_slots  # tokens held in each slot's cache
        self._neg = torch.finfo(self.dtype).min
        self.graphs: Any = None
        # on by default on CUDA: a decode step replays a graph (measured ~6x faster than eager
        # for a GPT-2-small at batch 1 on an H100, docs/datacenter.md); captured lazily per bucket
        if spec.options.get("cuda_graphs", True) and self.device_t.type == "cuda":
            from headrace.server.backends.torch_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, spec.options.get("graph_buckets"))
        # one tiny forward allocates the cache now rather than at the first request
        self.prefill(0, [0])
        self.release(0)
        if self.graphs is not None:
            self.graphs.capture()

    # --- model calls -------------------------------------------------------------------
    def _run(self, ids: torch.Tensor, plan: Plan, logits_to_keep: int) -> torch.Tensor:
        # ids: [N, S]; plan.write_pos: [N, S] -> logits [N, logits_to_keep, V]
        cols = torch.arange(plan.kv_len, device=self.device_t)
        allowed = cols[None, None, :] <= plan.write_pos[:, :, None]  # [N, S, L]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device_t)
        mask.masked_fill_(~allowed, self._neg)
        self.cache.plan = plan
        try:
            with _attention_kernels(self.device_t):
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask[:, None],  # [N, 1, S, L], additive
                    # padding rows of a graph write at the scratch column: clamp their position
                    position_ids=plan.write_pos.clamp(max=self.max_context - 1),
                    use_cache=True,
                    logits_to_keep=logits_to_keep,
                    **{self._cache_kw: self.cache},
                )
        finally:
            self.cache.plan = None
        logits: torch.Tensor = out.logits
        return logits

    def _kv_len(self, needed: int) -> int:
        # keys read per row, rounded up to a multiple of 64 (masked beyond each row's length):
        # fewer distinct shapes, aligned masks
        return min(-(-needed // KV_ALIGN) * KV_ALIGN, self.max_context + 1)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.max_slots})")

    def prefill(self, slot: int, token_ids: Sequence[int]) -> torch.Tensor:
        """Write the prompt into `slot` (replacing what it held) -> logits [V]."""
        self._check_slot(slot)
        n = len(token_ids)
        if not 0 < n <= self.max_context:
            raise ValueError(f"prompt of {n} tokens does not fit a context of {self.max_context}")
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device_t)
        pos = torch.arange(n, device=self.device_t)[None, :]  # [1, S]
        rows = torch.tensor([slot], dtype=torch.long, device=self.device_t)
        plan = Plan(rows=rows, write_pos=pos, kv_len=self._kv_len(n), start=slot)
        with torch.inference_mode():
            logits = self._run(ids, plan, logits_to_keep=1)
        self.lengths[slot] = n
        return logits[0, -1]

    def decode(self, slots: Sequence[int], last_tokens: Sequence[int]) -> torch.Tensor:
        """One token for each slot at its own position -> logits [len(slots), V]."""
        if len(slots) != len(last_tokens) or not slots:
            raise ValueError("decode needs one last token per slot, and at least one slot")
        positions = []
        for s in slots:
            self._check_slot(s)
            if self.lengths[s] == 0:
                raise ValueError(f"slot {s} holds no sequence (prefill it first)")
            if self.lengths[s] >= self.max_context:
                raise ValueError(f"slot {s} is full ({self.max_context} tokens)")
            positions.append(self.lengths[s])
        logits: torch.Tensor
        if self.graphs is not None and self.graphs.fits(len(slots)):
            logits = self.graphs.replay(slots, last_tokens, positions)
        else:
            logits = self._decode_eager(slots, last_tokens, positions)
        for s in slots:
            self.lengths[s] += 1
        return logits

    def _decode_eager(
        self, slots: Sequence[int], last_tokens: Sequence[int], positions: list[int]
    ) -> torch.Tensor:
        n = len(slots)
        # one host->device copy of [3, N] int64: tokens, rows, positions
        host = torch.tensor([list(last_tokens), list(slots), positions], dtype=torch.long)
        dev = host.to(self.device_t, non_blocking=False)
        plan = Plan(
            rows=dev[1],
            write_pos=dev[2][:, None],
            kv_len=self._kv_len(max(positions) + 1),
            start=slots[0] if list(slots) == list(range(slots[0], slots[0] + n)) else None,
        )
        with torch.inference_mode():
            logits = self._run(dev[0][:, None], plan, logits_to_keep=1)
        return logits[:, -1]  # [N, V]

    # --- sampling ----------------------------------------------------------------------
    def sample(
        self,
        logits: Any,
        params: Sequence[SamplingParams],
        generators: Sequence[np.random.Generator | None],
        histories: Sequence[Sequence[int]],
    ) -> list[int]:
        if self.device_t.type == "cpu":
            arr = logits.detach().float().numpy()  # zero-copy for fp32
            picks: list[int] = sample_numpy(arr, params, generators, histories)
            return picks
        from headrace.server.backends.torch_sampling import sample_torch

        chosen: list[int] = sample_torch(logits, params, generators, histories)
        return chosen

    def release(self, slot: int) -> None:
        self._check_slot(slot)
        self.lengths[slot] = 0  # the next prefill overwrites the rows it reads

    def close(self) -> None:
        self.graphs = None
        del self.model
        if self.device_t.type == "cuda":
            torch.cuda.empty_cache()

"""ONNX Runtime backends (CPU): the edge profile's encoder and decoder.

Never imports torch or transformers. onnxruntime itself is imported when a
backend is built, not when this module is imported, so `headrace.edge`
imports without it, and `ONNXRUNTIME` (the declaration pyproject.toml's
`headrace.backends` entry point names) is read without it too.

The graphs come from `headrace.build.export`:

- encoder: input_ids, attention_mask [B, S] -> logits [B, labels]
- decoder: input_ids [B, S], attention_mask [B, P + S], position_ids [B, S],
  past_key_values.{i}.key/value [B, H, P, D]
  -> logits [B, V] (last position), present.{i}.key/value [B, H, P + S, D]

  Its facts (num_layers, num_heads, head_dim, vocab_size, max_context,
  eos_token_id) are ONNX metadata_props written at export time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from headrace.server.backends.base import BackendDeclaration, BackendSpec
from headrace.server.backends.sampling_numpy import sample_numpy
from headrace.server.threads import named_os_thread
from headrace.server.types import SamplingParams

NAME = "onnxruntime"
MAX_DEFAULT_THREADS = 8  # past this, one request's ops gain little and starve the others

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}


def default_threads() -> int:
    """CPUs this process may run on, capped at MAX_DEFAULT_THREADS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_THREADS))


def session_options(options: dict[str, Any]) -> Any:
    """ORT SessionOptions from BackendSpec.options.

    Keys: intra_op_threads (default: default_threads()), inter_op_threads (1),
    graph_optimization_level ("disable" | "basic" | "extended" | "layout" | "all", default "all"),
    enable_cpu_mem_arena (True), allow_spinning (False: idle threads sleep at once; True
    lets them spin before sleeping, which burnt ~0.9 core between calls at one caller).

    The backends also read warmup (True: one small run at load, so the first
    request does not pay ONNX Runtime's first-run allocations) and, for the
    decoder, max_context (caps the manifest's).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(options.get("intra_op_threads") or default_threads())
    opts.inter_op_num_threads = int(options.get("inter_op_threads") or 1)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    level = str(options.get("graph_optimization_level", "all")).lower()
    if level not in _OPT_LEVELS:
        raise ValueError(
            f"graph_optimization_level must be one of {', '.join(_OPT_LEVELS)}, not {level!r}"
        )
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[level])
    opts.enable_cpu_mem_arena = bool(options.get("enable_cpu_mem_arena", True))
    if not options.get("allow_spinning", False):
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only; ORT's warnings go to stderr otherwise
    return opts


def open_session(path: Path, options: dict[str, Any]) -> Any:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    # the session's pool threads are started here and keep this OS name ("ort-pool")
    with named_os_thread("ort-pool"):
        return ort.InferenceSession(
            str(path), session_options(options), providers=["CPUExecutionProvider"]
        )


def metadata(session: Any) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


class OrtEncoder:
    """A sequence classifier graph on ONNX Runtime (CPU)."""

    name = NAME
    device = "cpu"

    def __init__(self, spec: BackendSpec) -> None:
        self.precision = spec.precision
        self._session = open_session(spec.path, spec.options)
        self._inputs = {i.name for i in self._session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - self._inputs
        kind = metadata(self._session).get("headrace.kind", "encoder")
        if missing or kind != "encoder":
            raise ValueError(
                f"{spec.path.name} is not an encoder graph ({kind}; missing {sorted(missing)})"
            )
        self.labels = len(spec.manifest.labels)
        if spec.options.get("warmup", True):  # the first run allocates: not on a request's time
            ones = np.ones((1, 8), dtype=np.int64)
            self.forward(ones, ones)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids, attention_mask: int64 [B, S] -> logits float32 [B, labels]."""
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        logits = self._session.run(["logits"], feeds)[0]
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        self._session = None


class OrtDecoder:
    """A causal LM graph with a KV cache of `max_slots` sequences, in host memory.

    cache: [max_slots, 2 x layers (key, value per layer), heads, max_context, head_dim]
    float32, allocated zeroed (calloc: pages become resident only as slots fill them), is
    where each slot's keys and values are kept, contiguous from position 0.

    A decode step runs with IO binding over two preallocated buffers: the
    past is read from one, ONNX Runtime writes the presents [B, H, P + 1, D] into
    the other, and each new key/value is also written back into the cache. When
    the next step has the same slots in the same order (most steps), those
    presents are its past as they are: nothing is gathered. Otherwise each slot's
    past is copied from the cache into a buffer, padded to the longest with mask
    zeros. A row's past may so hold masked gaps (where a shorter slot was padded);
    position ids come from each slot's own length, so its logits do not change.
    The two buffers hold at most twice the batch's past (docs/edge.md has the figures).
    """

    name = NAME
    device = "cpu"

    def __init__(self, spec: BackendSpec) -> None:
        self.precision = spec.precision
        self._session = open_session(spec.path, spec.options)
        meta = metadata(self._session)
        try:
            self.num_layers = int(meta["num_layers"])
            self.num_heads = int(meta["num_heads"])
            self.head_dim = int(meta["head_dim"])
            self.vocab_size = int(meta["vocab_size"])
            graph_context = int(meta["max_context"])
        except KeyError as exc:
            raise ValueError(f"{spec.path.name} lacks decoder metadata {exc}") from None
        eos = int(meta.get("eos_token_id", "-1"))
        self.eos_token_id: int | None = None if eos < 0 else eos
        wanted = spec.options.get("max_context") or spec.manifest.generation.max_context
        self.max_context = min(graph_context, int(wanted))
        self.max_slots = int(spec.max_slots)
        self._past = [
            f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")
        ]
        self._outputs = ["logits"] + [
            f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")
        ]
        # [slots, past/present tensor (layer i: key 2i, value 2i + 1), H, C, D]
        self._cache = np.zeros(
            (self.max_slots, len(self._past), self.num_heads, self.max_context, self.head_dim),
            dtype=np.float32,
        )
        self._lengths = np.zeros(self.max_slots, dtype=np.int64)  # tokens held per slot
        self._empty_past = np.zeros((1, self.num_heads, 0, self.head_dim), dtype=np.float32)
        # two flat buffers, each room for every tensor of a full batch (see _stacked)
        self._buffers = [np.zeros(self._cache.size, np.float32) for _ in range(2)]
        self._tensors = np.arange(len(self._past))[:, None]  # [T, 1], to index the cache
        self._staging = np.zeros(self._cache[0].size, np.float32)  # one prefill's presents
        self._batch: _Batch | None = None  # the last decode's presents, if still valid
        self._binding = self._session.io_binding()
        if spec.options.get("warmup", True):  # the first runs allocate: not on a request's time
            self.prefill(0, [0] * max(1, min(8, self.max_context - 1)))
            if self.length(0) < self.max_context:
                self.decode([0], [0])
            self.release(0)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.max_slots})")

    def length(self, slot: int) -> int:
        """Tokens in `slot`'s cache (0 when free)."""
        return int(self._lengths[slot])

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        """Run the prompt into `slot` (zero-length past) -> logits [vocab] of its last token."""
        self._check_slot(slot)
        self._forget(slot)
        n = len(token_ids)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        if n > self.max_context:
            raise ValueError(f"prompt of {n} tokens exceeds the context of {self.max_context}")
        io = self._binding
        io.bind_cpu_input("input_ids", np.asarray(token_ids, dtype=np.int64)[None, :])  # [1, n]
        io.bind_cpu_input("attention_mask", np.ones((1, n), dtype=np.int64))
        io.bind_cpu_input("position_ids", np.arange(n, dtype=np.int64)[None, :])
        for name in self._past:
            io.bind_cpu_input(name, self._empty_past)
        logits = np.empty((1, self.vocab_size), dtype=np.float32)
        io.bind_ortvalue_output("logits", _ortvalue(logits))
        # the presents [1, H, n, D] go to the slot's own cache rows through a staging
        # buffer (the cache's [H, C, D] rows are not contiguous for n < C): one copy
        staged = self._staging[: len(self._past) * self.num_heads * n * self.head_dim]
        presents = staged.reshape(len(self._past), 1, self.num_heads, n, self.head_dim)
        for name, array in zip(self._outputs[1:], presents, strict=True):
            io.bind_ortvalue_output(name, _ortvalue(array))
        self._session.run_with_iobinding(io)
        self._cache[slot, :, :, :n, :] = presents[:, 0]
        self._lengths[slot] = n
        row: np.ndarray = logits[0]
        return row  # [V]

    def decode(self, slots: Sequence[int], last_tokens: Sequence[int]) -> np.ndarray:
        """One step for each slot: last_tokens[i] goes to slots[i] -> logits [len(slots), V]."""
        if len(slots) != len(last_tokens) or not slots:
            raise ValueError("decode needs one last token per slot, and at least one slot")
        key = tuple(int(slot) for slot in slots)
        for slot in key:
            self._check_slot(slot)
        if len(set(key)) != len(key):
            raise ValueError("decode got a slot twice")
        idx = np.asarray(key, dtype=np.int64)  # [B]
        lens = self._lengths[idx]  # [B] tokens already cached per slot
        if (lens == 0).any():
            raise ValueError("decode on a slot that was not prefilled")
        if (lens >= self.max_context).any():
            raise ValueError(f"a slot is full ({self.max_context} tokens)")
        batch = self._batch
        if batch is None or batch.slots != key:
            batch = self._gather(key, lens)
        rows, past = batch.mask.shape
        # attention_mask: [B, past + 1]; the past's mask and the new token
        mask = np.concatenate([batch.mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        presents = self._stacked(1 - batch.buffer, rows, past + 1)  # [T, B, H, past + 1, D]
        logits = np.empty((rows, self.vocab_size), dtype=np.float32)
        io = self._binding
        io.bind_cpu_input("input_ids", np.asarray(last_tokens, dtype=np.int64)[:, None])
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", lens[:, None].copy())  # [B, 1]
        for name, array in zip(self._past, batch.pasts, strict=True):  # [B, H, past, D] each
            io.bind_cpu_input(name, array)
        io.bind_ortvalue_output("logits", _ortvalue(logits))
        for name, array in zip(self._outputs[1:], presents, strict=True):
            io.bind_ortvalue_output(name, _ortvalue(array))
        self._batch = None  # until the step succeeded
        self._session.run_with_iobinding(io)
        # every tensor's new key/value into its slot's cache at the slot's length, one copy
        self._cache[idx[None, :], self._tensors, :, lens[None, :], :] = presents[:, :, :, past, :]
        self._lengths[idx] = lens + 1
        self._batch = _Batch(key, 1 - batch.buffer, presents, mask)
        return logits  # [B, V]

    def _stacked(self, buffer: int, rows: int, width: int) -> np.ndarray:
        """The buffer as [T, rows, H, width, D]: each tensor [rows, H, width, D] contiguous.

        One array for all tensors, so a step's copies are one numpy call each: every
        call that releases the GIL may wait that long again to get it back while the
        event loop is busy (8 per-tensor copies took ~30 ms beside a busy Python thread).
        """
        shape = (len(self._past), rows, self.num_heads, width, self.head_dim)
        return self._buffers[buffer][: int(np.prod(shape))].reshape(shape)

    def _gather(self, key: tuple[int, ...], lens: np.ndarray) -> _Batch:
        """Each slot's past copied from the cache into buffer 0, padded to the longest."""
        past = int(lens.max())
        pasts = self._stacked(0, len(key), past)
        for row, (slot, n) in enumerate(zip(key, lens.tolist(), strict=True)):
            pasts[:, row, :, :n, :] = self._cache[slot, :, :, :n, :]  # past n: masked out
        mask = (np.arange(past)[None, :] < lens[:, None]).astype(np.int64)
        return _Batch(key, 0, pasts, mask)

    def _forget(self, slot: int) -> None:
        """The slot's contents change: the kept batch no longer holds its past."""
        if self._batch is not None and slot in self._batch.slots:
            self._batch = None

    def sample(
        self,
        logits: Any,
        params: Sequence[SamplingParams],
        generators: Sequence[np.random.Generator | None],
        histories: Sequence[Sequence[int]],
    ) -> list[int]:
        tokens: list[int] = sample_numpy(np.asarray(logits), params, generators, histories)
        return tokens

    def release(self, slot: int) -> None:
        self._check_slot(slot)
        self._forget(slot)
        self._lengths[slot] = 0

    def close(self) -> None:
        self._batch = None
        self._binding = None
        self._session = None
        self._cache = np.zeros((0,), dtype=np.float32)
        self._buffers = []


@dataclass(frozen=True, slots=True)
class _Batch:
    """A decode step's batch as ONNX Runtime reads it: the next step's past, if the same slots."""

    slots: tuple[int, ...]
    buffer: int  # the buffer holding `pasts`
    pasts: np.ndarray  # [T, B, H, P, D]: [j] is past_key_values input j
    mask: np.ndarray  # [B, P] int64: ones where a row holds a token


def _ortvalue(array: np.ndarray) -> Any:
    """An OrtValue over the array's own memory: ONNX Runtime writes the output in place."""
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)


ONNXRUNTIME = BackendDeclaration(
    name=NAME,
    profiles={"edge": 0, "cpu": 0},  # the cpu profile prefers it to torch (rank 1)
    encoder=OrtEncoder,
    decoder=OrtDecoder,
)

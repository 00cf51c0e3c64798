"""What a backend is: arrays in, arrays out. No gRPC, no asyncio.

A backend declares itself once, in a `BackendDeclaration` (its name, the
tasks it serves, the profiles that may pick it) that an entry point of the
`headrace.backends` group names; `registry.py` reads those. A declaration
module imports without the backend's runtime (torch, onnxruntime,
tensorrt): the loaders import it when a model asks for one, so
`headrace.server` imports without any of them.

Threading: the engine calls a backend from one worker thread at a time per
model (the batcher's or scheduler's executor). Backends need not be
thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from headrace.server.manifest import Artifact, Manifest
from headrace.server.types import SamplingParams, Task


class BackendUnavailable(RuntimeError):
    """The backend's runtime is missing here (e.g. no tensorrt, no CUDA)."""


# The server's options carry this key when generate models get their own intra-op
# thread count; `task_options` turns it into their "intra_op_threads" where the backend
# keeps a thread count per model (an ONNX Runtime session). torch's is one per process
# (`torch.set_num_threads`): a torch model keeps `intra_op_threads`.
DECODER_THREADS = "decoder_intra_op_threads"
THREADS_PER_MODEL = frozenset({"onnxruntime"})


def task_options(options: Mapping[str, Any], task: Task, backend: str) -> dict[str, Any]:
    """The server's backend options as a `task` model on `backend` gets them."""
    out = dict(options)
    decoder = out.pop(DECODER_THREADS, None)
    if decoder is not None and task is Task.GENERATE and backend in THREADS_PER_MODEL:
        out["intra_op_threads"] = decoder
    return out


@dataclass(frozen=True)
class BackendSpec:
    """Everything a backend needs to load one model version."""

    task: Task
    backend: str
    path: Path  # the artifact, absolute
    precision: str
    device: str  # "cpu", "cuda", "cuda:0"
    manifest: Manifest
    version_dir: Path
    max_slots: int = 16  # decoder: KV-cache sequences
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"intra_op_threads": 2}


@runtime_checkable
class EncoderBackend(Protocol):
    """A sequence classifier."""

    name: str  # "torch", "onnxruntime", "tensorrt"
    precision: str  # "fp32", "fp16", "int8"
    device: str  # "cpu", "cuda:0"

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids, attention_mask: int64 [B, S] -> logits float32 [B, num_labels] (numpy)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class DecoderBackend(Protocol):
    """A causal LM that owns a KV cache of `max_slots` sequences.

    Logits stay where they were computed: `prefill` and `decode` return the
    backend's own array type, and `sample` picks the next tokens there, so a
    GPU step never copies a vocabulary-wide tensor to the host.
    """

    name: str
    precision: str
    device: str
    max_slots: int  # sequences the KV cache holds at once
    max_context: int  # prompt + generated tokens one slot holds
    vocab_size: int

    def prefill(self, slot: int, token_ids: Sequence[int]) -> Any:
        """Run the prompt into `slot`'s cache -> logits of its last position, [vocab]."""
        ...

    def decode(self, slots: Sequence[int], last_tokens: Sequence[int]) -> Any:
        """One step for every slot in `slots` at once -> logits [len(slots), vocab]."""
        ...

    def sample(
        self,
        logits: Any,
        params: Sequence[SamplingParams],
        generators: Sequence[np.random.Generator | None],
        histories: Sequence[Sequence[int]],
    ) -> list[int]:
        """Pick one token per row of `logits` ([N, vocab] or [vocab] for N == 1).

        `generators[i]` is sequence i's own RNG (None when greedy), so a seeded
        sequence samples the same tokens whatever shares its batch;
        `histories[i]` is its prompt + output, for the repetition penalty.
        """
        ...

    def release(self, slot: int) -> None:
        """Free `slot`; its cache may be overwritten by the next prefill."""
        ...

    def close(self) -> None: ...


def ensure_2d(logits: np.ndarray) -> np.ndarray:
    return logits[None, :] if logits.ndim == 1 else logits


def make_generator(params: SamplingParams) -> np.random.Generator | None:
    """The RNG the engine gives one sequence for `sample`: None when greedy, seeded when
    a seed is given (torch_sampling draws its per-row noise seeds from it too)."""
    if params.greedy:
        return None
    return np.random.default_rng(params.seed)


def _runs_anywhere(artifact: Artifact, device: str) -> bool:
    return True


@dataclass(frozen=True)
class BackendDeclaration:
    """A backend, as the registry and the profiles see it.

    `profiles` ranks it in each profile that may serve it: the lowest rank is tried
    first (cpu: onnxruntime 0, torch 1). A loader imports the runtime and may raise
    BackendUnavailable (or ImportError) when it is missing. `usable` is asked before an
    artifact is chosen, for facts a manifest cannot tell (an engine built for another GPU).
    """

    name: str  # the manifest's `artifacts[].backend`, BackendSpec.backend, --backend
    profiles: Mapping[str, int]
    encoder: Callable[[BackendSpec], EncoderBackend] | None = None  # serves Task.CLASSIFY
    decoder: Callable[[BackendSpec], DecoderBackend] | None = None  # serves Task.GENERATE
    usable: Callable[[Artifact, str], bool] = _runs_anywhere  # (artifact, device) -> bool

    @property
    def tasks(self) -> tuple[Task, ...]:
        return tuple(
            task
            for task, loader in ((Task.CLASSIFY, self.encoder), (Task.GENERATE, self.decoder))
            if loader is not None
        )

"""Structured pruning of BERT-family classifiers: attention heads and FFN neurons ranked by
measured importance and removed physically (smaller matrices, not masks).

Importance is first-order (Michel et al. 2019 for heads, the same Taylor score for
neurons): for a head h with context output a_h (the slice of the attention output that
`attention.output.dense` reads), I_h = sum over texts of |sum over positions of
a_h * dL/da_h|, which is |dL/dxi_h| for a gate xi_h = 1 on the head; for FFN neuron i,
the same with its GELU output. L is the distillation loss against the teacher's logits.
Scores are normalised per layer (L2, as Michel et al.) so one global ranking compares
layers.

A pruned checkpoint is a normal safetensors folder whose config.json carries
`headrace_pruned` ({"heads": [kept per layer], "intermediate": [width per layer]}):
standard transformers cannot load it (layers differ in width), `load_classifier` can.
Serving uses its ONNX forms, which need no loader.

Build-time only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PRUNED_KEY = "headrace_pruned"
MIN_NEURONS = 16  # per layer: a layer keeps at least this many FFN neurons (and one head)


@dataclass(frozen=True)
class Target:
    """What the pruning amount must reach: int8 size, batch-1 latency, or speed-up."""

    kind: str  # "mb" | "ms" | "x"
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        """'14mb' (dynamic-int8 ONNX at most 14 MB), '0.5ms' (int8 p50 at batch 1 at most
        0.5 ms), '10x' (int8 at batch 1 at least 10x faster than the fp32 teacher on ORT)."""
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(mb|ms|x)\s*", text.lower())
        if m is None or float(m.group(1)) <= 0:
            raise ValueError(f"prune target {text!r}: use e.g. 14mb, 0.5ms or 10x")
        return cls(kind=m.group(2), value=float(m.group(1)))

    def met(self, megabytes: float, ms: float, speedup: float) -> bool:
        if self.kind == "mb":
            return megabytes <= self.value
        if self.kind == "ms":
            return ms <= self.value
        return speedup >= self.value

    def __str__(self) -> str:
        return f"{self.value:g}{self.kind}"


def _layers(model: Any) -> Any:
    return model.base_model.encoder.layer


def head_dim(model: Any) -> int:
    return int(_layers(model)[0].attention.self.attention_head_size)


# --------------------------------------------------------------------------- importance


def importance(
    model: Any, batches: Sequence[tuple[np.ndarray, np.ndarray]], loss_fn: Callable[..., Any]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """-> (head scores per layer [H_l], neuron scores per layer [I_l]), normalised per layer.

    `batches`: (input_ids, attention_mask) int64 [B, S]; `loss_fn(logits, batch_index)`."""
    import torch

    layers = _layers(model)
    dim = head_dim(model)
    heads = [torch.zeros(int(layer.attention.output.dense.in_features) // dim) for layer in layers]
    neurons = [torch.zeros(int(layer.output.dense.in_features)) for layer in layers]
    hooks = []

    def watch(module: Any, into: torch.Tensor, group: int) -> Any:
        def pre(_: Any, args: tuple[Any, ...]) -> None:
            act = args[0]  # [B, S, F]

            def grad_hook(grad: torch.Tensor) -> None:
                taylor = (act.detach() * grad).sum(dim=1)  # [B, F]
                per = taylor.view(taylor.shape[0], -1, group).sum(-1) if group > 1 else taylor
                into.add_(per.abs().sum(0))

            act.register_hook(grad_hook)

        return module.register_forward_pre_hook(pre)

    for i, layer in enumerate(layers):
        hooks.append(watch(layer.attention.output.dense, heads[i], dim))
        hooks.append(watch(layer.output.dense, neurons[i], 1))
    model.eval()  # no dropout: the scores are deterministic
    try:
        for b, (ids, mask) in enumerate(batches):
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            loss_fn(logits.logits, b).backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)

    def norm(scores: list[torch.Tensor]) -> list[np.ndarray]:
        return [(s / (s.norm() + 1e-12)).numpy() for s in scores]

    return norm(heads), norm(neurons)


def plan(
    head_scores: Sequence[np.ndarray], neuron_scores: Sequence[np.ndarray], keep: float
) -> dict[str, list[list[int]]]:
    """Keep the top `keep` fraction of heads and of neurons in one ranking across layers
    (each layer keeps >= 1 head and >= MIN_NEURONS neurons) -> kept indices per layer."""

    def choose(scores: Sequence[np.ndarray], minimum: int) -> list[list[int]]:
        total = sum(len(s) for s in scores)
        n_keep = max(1, round(keep * total))
        flat = sorted(
            ((float(v), li, j) for li, s in enumerate(scores) for j, v in enumerate(s)),
            reverse=True,
        )
        kept: list[set[int]] = [set() for _ in scores]
        for li, s in enumerate(scores):  # each layer's best first
            kept[li].update(int(j) for j in np.argsort(-s)[: min(minimum, len(s))])
        for _, li, j in flat:
            if sum(len(k) for k in kept) >= n_keep:
                break
            kept[li].add(j)
        return [sorted(k) for k in kept]

    return {"heads": choose(head_scores, 1), "neurons": choose(neuron_scores, MIN_NEURONS)}


# --------------------------------------------------------------------------- surgery


def _take_rows(linear: Any, index: Any) -> None:
    import torch

    linear.weight = torch.nn.Parameter(linear.weight.data[index].clone())
    linear.bias = torch.nn.Parameter(linear.bias.data[index].clone())
    linear.out_features = len(index)


def _take_cols(linear: Any, index: Any) -> None:
    import torch

    linear.weight = torch.nn.Parameter(linear.weight.data[:, index].clone())
    linear.in_features = len(index)


def prune_model(model: Any, keep: dict[str, list[list[int]]]) -> Any:
    """Remove, in place, every head and FFN neuron not in `keep` (from `plan`); records the
    kept heads and widths in the config (`headrace_pruned`) so `load_classifier` can rebuild
    the shapes."""
    import torch

    dim = head_dim(model)
    record = getattr(model.config, PRUNED_KEY, None) or {}
    original_heads = record.get("heads") or [
        list(range(int(layer.attention.self.num_attention_heads))) for layer in _layers(model)
    ]
    for i, layer in enumerate(_layers(model)):
        heads = keep["heads"][i]
        cols = torch.tensor([h * dim + d for h in heads for d in range(dim)], dtype=torch.int64)
        attn = layer.attention.self
        for lin in (attn.query, attn.key, attn.value):
            _take_rows(lin, cols)
        attn.num_attention_heads = len(heads)
        attn.all_head_size = len(heads) * dim
        _take_cols(layer.attention.output.dense, cols)
        neurons = torch.tensor(keep["neurons"][i], dtype=torch.int64)
        _take_rows(layer.intermediate.dense, neurons)
        _take_cols(layer.output.dense, neurons)
        original_heads[i] = [original_heads[i][h] for h in heads]
    setattr(
        model.config,
        PRUNED_KEY,
        {
            "heads": original_heads,
            "intermediate": [len(n) for n in keep["neurons"]],
        },
    )
    return model


def load_classifier(hf_dir: Path, **kwargs: Any) -> Any:
    """A sequence classifier from `hf_dir`, pruned or not (kwargs go to transformers)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    hf_dir = Path(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    record = getattr(config, PRUNED_KEY, None)
    if not record:
        return AutoModelForSequenceClassification.from_pretrained(hf_dir, **kwargs)
    from safetensors.torch import load_file

    model = AutoModelForSequenceClassification.from_config(config, **kwargs)  # type: ignore[no-untyped-call]
    shapes = {
        "heads": [list(range(len(h))) for h in record["heads"]],
        "neurons": [list(range(n)) for n in record["intermediate"]],
    }
    setattr(model.config, PRUNED_KEY, None)
    prune_model(model, shapes)
    setattr(model.config, PRUNED_KEY, record)
    model.load_state_dict(load_file(str(hf_dir / "model.safetensors")), strict=True)
    return model.eval()


def is_pruned(hf_dir: Path) -> bool:
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    return bool(config.get(PRUNED_KEY))


def summary(model: Any) -> dict[str, Any]:
    layers = _layers(model)
    heads = [int(layer.attention.self.num_attention_heads) for layer in layers]
    widths = [int(layer.intermediate.dense.out_features) for layer in layers]
    return {
        "heads_per_layer": heads,
        "ffn_per_layer": widths,
        "heads_kept": sum(heads),
        "ffn_kept": sum(widths),
        "parameters": sum(p.numel() for p in model.parameters()),
    }

"""A static KV cache of `max_slots` sequences, fed to Hugging Face models as their `Cache`.

One buffer per layer and per K/V: [max_slots + 1, kv_heads, max_context + 1, head_dim],
allocated once (the last row and the last column are scratch, written by padding rows
of a bucketed decode and never read). Each slot keeps its own length, so one forward
writes every row at that row's own position and attends over that row's valid prefix
through an explicit 4D additive mask (transformers returns a 4D mask as-is).

transformers' attention modules call `cache.update(key, value, layer_idx, ...)` and use
the keys/values it returns; that is the whole seam. Positions and the mask are computed
here, before the forward, and read by `update` through `plan`.

Checked against transformers 5.0 and 5.24 (the locked version): 5.x GPT-2 attention calls
`update(key, value, layer_idx, kwargs=...)`; the forward takes the cache as `cache=`
(5.24; `past_key_values=` is deprecated there and removed in 5.40) or `past_key_values=`
(5.0). A 4D float mask is returned by `create_causal_mask` as-is, before it asks the
cache anything, so `update`, `get_seq_length` and `__len__` are all a forward reads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch


def cache_keyword(model: Any) -> str:
    """The forward's keyword for a Cache object: "cache" (transformers >= 5.24) or
    "past_key_values" (earlier)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The Cache a forward returned, under its 5.24 name or the older one."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class Plan:
    """What one forward writes and reads, set before the model runs."""

    rows: torch.Tensor  # [N] int64: cache row (slot) of each batch row
    write_pos: torch.Tensor  # [N, S] int64: position written by each query token
    kv_len: int  # keys/values returned per row: columns [0, kv_len)
    start: int | None  # rows == arange(start, start + N): read a view instead of gathering


class SlotCache:
    """Duck-typed `transformers.Cache`: only what decoder attention layers call."""

    is_compileable = False

    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        max_context: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.max_context = max_context
        self.dtype = dtype
        self.device = device
        # allocated at the first update, when kv_heads and head_dim are known
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.plan: Plan | None = None

    # --- what transformers calls -------------------------------------------------------
    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [N, kv_heads, S, head_dim]. The rest (4.x's cache_kwargs,
        # 5.x's kwargs=) carries rotary and sliding-window facts a static slot cache ignores:
        # positions come from `plan`.
        plan = self.plan
        assert plan is not None, "SlotCache.update outside a planned forward"
        if layer_idx >= len(self.keys):
            self._allocate(key_states)
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        rows = plan.rows[:, None].expand_as(plan.write_pos)  # [N, S]
        # buf[rows, :, pos] selects [N, S, kv_heads, head_dim]
        k_buf[rows, :, plan.write_pos] = key_states.transpose(1, 2).to(self.dtype)
        v_buf[rows, :, plan.write_pos] = value_states.transpose(1, 2).to(self.dtype)
        if plan.start is not None:
            end = plan.start + plan.rows.shape[0]
            return k_buf[plan.start : end, :, : plan.kv_len], v_buf[
                plan.start : end, :, : plan.kv_len
            ]
        # [N, kv_heads, kv_len, head_dim]
        return (
            k_buf[:, :, : plan.kv_len].index_select(0, plan.rows),
            v_buf[:, :, : plan.kv_len].index_select(0, plan.rows),
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def __len__(self) -> int:
        return self.num_layers

    # --- ours ----------------------------------------------------------------------------
    def _allocate(self, like: torch.Tensor) -> None:
        _, heads, _, head_dim = like.shape
        shape = (self.max_slots + 1, heads, self.max_context + 1, head_dim)
        while len(self.keys) < self.num_layers:
            self.keys.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=self.dtype, device=self.device))

    @property
    def scratch_row(self) -> int:
        return self.max_slots

    @property
    def scratch_col(self) -> int:
        return self.max_context

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

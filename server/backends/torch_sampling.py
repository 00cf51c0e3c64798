"""Next-token choice where the logits are (GPU or CPU), as batch tensors.

Per-row temperature, top-k, top-p and repetition penalty become [N] tensors, and
each warper runs only when some row needs it (as TGI's HeterogeneousNextTokenChooser).
Sampling uses the exponential-noise argmax trick (gpt-fast's
`multinomial_sample_one_no_sync`): argmax(p / E) with E ~ Exp(1) draws from p. The
noise of row i comes from a counter-based hash of (seed_i, token id), and seed_i is
drawn from that sequence's own numpy Generator on the host: a seeded sequence gets the
same tokens whatever shares its batch, and no vocabulary-wide tensor crosses the bus.
The only device->host transfer is the chosen ids, [N] int64, at the very end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from headrace.server.types import SamplingParams

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32 (C. Wellons): a bijection on 32-bit values with good avalanche. x holds
    # values in [0, 2**32) as int64; x * c may wrap past 2**63, which keeps its low 32 bits
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """_mix32 of one value, on the host."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _uniform(mixed_seeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # mixed_seeds: [N, 1] int64; ids: [N, M] or [1, M] -> (0, 1) float32 [N, M]
    h = _mix32(mixed_seeds ^ ids)
    return ((h >> 8).to(torch.float32) + 0.5) * (2.0**-24)


def seeded_uniform(seeds: torch.Tensor, ids: int | torch.Tensor) -> torch.Tensor:
    """seeds: [N] int64 in [0, 2**32); ids: token ids [N, M] (or V for all of 0..V-1)
    -> uniform noise [N, M] in (0, 1), float32, a function of (seed, token id) alone."""
    if isinstance(ids, int):
        ids = torch.arange(ids, device=seeds.device, dtype=torch.int64)[None, :]
    return _uniform(_mix32(seeds[:, None]), ids)


def _row_seed(rng: np.random.Generator | None) -> int:
    if rng is None:  # a sampled row must own an RNG; make one rather than fail
        rng = np.random.default_rng()
    return int(rng.integers(0, 2**32))


def apply_repetition_penalty(
    x: torch.Tensor, histories: Sequence[Sequence[int]], penalties: Sequence[float]
) -> torch.Tensor:
    """x: [N, V] float32 -> penalised copy (CTRL-style: positive / p, negative * p)."""
    n, vocab = x.shape
    width = max((len(h) for h in histories), default=0)
    if width == 0:
        return x
    # histories padded with `vocab`, a column that is dropped after the scatter
    hist = np.full((n, width), vocab, dtype=np.int64)
    for i, h in enumerate(histories):
        if penalties[i] != 1.0 and h:
            ids = np.asarray(h, dtype=np.int64)
            hist[i, : len(ids)] = np.where((ids >= 0) & (ids < vocab), ids, vocab)
    seen = torch.zeros((n, vocab + 1), dtype=torch.bool, device=x.device)
    seen.scatter_(1, torch.from_numpy(hist).to(x.device), True)
    seen = seen[:, :vocab]
    pen = torch.tensor(penalties, dtype=torch.float32, device=x.device)[:, None]
    return torch.where(seen, torch.where(x > 0, x / pen, x * pen), x)


def sample_torch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[np.random.Generator | None],
    histories: Sequence[Sequence[int]],
) -> list[int]:
    """logits: [N, V] (or [V] for N == 1), any float dtype, any device -> one id per row."""
    x = logits[None, :] if logits.ndim == 1 else logits
    x = x.float()
    n, vocab = x.shape
    dev = x.device
    penalties = [p.repetition_penalty for p in params]
    if any(pen != 1.0 for pen in penalties):
        x = apply_repetition_penalty(x, histories, penalties)
    sampled = [not p.greedy for p in params]
    if not any(sampled):
        greedy: list[int] = x.argmax(dim=-1).tolist()  # the one sync: N ids
        return greedy
    greedy_ids = x.argmax(dim=-1) if not all(sampled) else None  # [N]

    # per-row settings, two small host->device copies: [3, N] float32 and [2, N] int64
    ks = [p.top_k if (not p.greedy and 0 < p.top_k < vocab) else 0 for p in params]
    ps = [p.top_p if not p.greedy else 1.0 for p in params]
    temps = [p.temperature if not p.greedy else 1.0 for p in params]
    seeds = [_mix32_int(_row_seed(generators[i])) if sampled[i] else 0 for i in range(n)]
    fl = torch.tensor([temps, ps, [float(b) for b in sampled]], dtype=torch.float32).to(dev)
    it = torch.tensor([ks, seeds], dtype=torch.int64).to(dev)
    temp_t, p_t, sampled_t = fl[0][:, None], fl[1][:, None], fl[2] > 0
    k_t, mixed_t = it[0][:, None], it[1][:, None]
    x = x / temp_t
    ids: torch.Tensor | None = None  # token id of each column of x when x is not [N, V]
    if all(ks[i] > 0 for i in range(n) if sampled[i]):
        # every sampled row has a top-k: work on the kmax best candidates only, sorted
        x, ids = torch.topk(x, max(ks), dim=-1)  # [N, K] descending, [N, K]
        cols = torch.arange(x.shape[1], device=dev)
        x = x.masked_fill(cols[None, :] >= k_t, -torch.inf)
    elif any(ks):
        top = torch.topk(x, max(ks), dim=-1).values  # [N, kmax], descending
        thr = top.gather(1, (k_t - 1).clamp(min=0))  # [N, 1]
        thr = torch.where(k_t > 0, thr, torch.full_like(thr, -torch.inf))
        x = x.masked_fill(x < thr, -torch.inf)
    if any(p < 1.0 for p in ps):
        if ids is None:
            x, ids = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
        drop = (before >= p_t) & (p_t < 1.0)
        drop[:, 0] = False  # always keep the best token
        x = x.masked_fill(drop, -torch.inf)
    probs = torch.softmax(x, dim=-1)
    # the noise of a token depends on (row seed, token id) only, whatever columns x has
    cols = torch.arange(vocab, device=dev)[None, :] if ids is None else ids
    noise = -torch.log(_uniform(mixed_t, cols))  # Exp(1)
    pick = (probs / noise).argmax(dim=-1)  # [N]
    sampled_ids = pick if ids is None else ids.gather(1, pick[:, None])[:, 0]
    chosen = sampled_ids if greedy_ids is None else torch.where(sampled_t, sampled_ids, greedy_ids)
    picks: list[int] = chosen.tolist()  # the one sync: N ids
    return picks

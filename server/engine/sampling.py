"""Next-token choice on CPU, per sequence, in numpy.

Each row of a batch has its own SamplingParams and its own RNG, so a seeded
sequence gets the same tokens whatever else shares its batch. Greedy rows
skip every warper. Warpers run only on rows that ask for them (as TGI's
HeterogeneousNextTokenChooser does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from headrace.server.types import SamplingParams


def make_generator(params: SamplingParams) -> np.random.Generator | None:
    """The RNG of one sequence: None when greedy, seeded when a seed is given."""
    if params.greedy:
        return None
    return np.random.default_rng(params.seed)


def apply_repetition_penalty(row: np.ndarray, history: Sequence[int], penalty: float) -> None:
    """CTRL-style penalty, in place: positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or not history:
        return
    ids = np.fromiter(set(history), dtype=np.int64)
    ids = ids[ids < row.shape[0]]
    vals = row[ids]
    row[ids] = np.where(vals > 0, vals / penalty, vals * penalty)


def _sample_row(row: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    # row: [V] float32 logits, already penalised
    logits = row.astype(np.float64) / p.temperature
    vocab = logits.shape[0]
    cand: np.ndarray | None = None  # candidate token ids; None = the whole vocabulary
    if 0 < p.top_k < vocab:
        cand = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
        logits = logits[cand]
    if p.top_p < 1.0:
        # sort only when nucleus filtering needs it: [V] argsort is the costly part
        order = np.argsort(-logits, kind="stable")
        cand = order if cand is None else cand[order]
        logits = logits[order]
    probs = np.exp(logits - logits.max())
    cdf = np.cumsum(probs)
    total = cdf[-1]
    if p.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = int(np.searchsorted(cdf, p.top_p * total) + 1)
        cdf = cdf[:keep]
        total = cdf[-1]
    # inverse CDF: one uniform draw per token, whatever the vocabulary size
    pick = min(int(np.searchsorted(cdf, rng.random() * total, side="right")), cdf.shape[0] - 1)
    return int(pick if cand is None else cand[pick])


def sample_numpy(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    generators: Sequence[np.random.Generator | None],
    histories: Sequence[Sequence[int]],
) -> list[int]:
    """logits: [N, V] (or [V] for N == 1) -> one token id per row."""
    if logits.ndim == 1:
        logits = logits[None, :]
    needs_copy = any(p.repetition_penalty != 1.0 for p in params)
    if needs_copy:
        logits = np.array(logits, dtype=np.float32, copy=True)
    out: list[int] = []
    greedy_rows = [i for i, p in enumerate(params) if p.greedy and p.repetition_penalty == 1.0]
    greedy = (
        dict(zip(greedy_rows, np.argmax(logits[greedy_rows], axis=-1).tolist(), strict=True))
        if greedy_rows
        else {}
    )
    for i, p in enumerate(params):
        if i in greedy:
            out.append(int(greedy[i]))
            continue
        row = logits[i]
        apply_repetition_penalty(row, histories[i], p.repetition_penalty)
        if p.greedy:
            out.append(int(np.argmax(row)))
            continue
        rng = generators[i]
        if rng is None:  # a sampled row must own an RNG; make one rather than fail
            rng = np.random.default_rng()
        out.append(_sample_row(row, p, rng))
    return out

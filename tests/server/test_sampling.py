"""The per-sequence numpy sampler."""

from __future__ import annotations

import numpy as np
from headrace.server.backends.base import make_generator
from headrace.server.backends.sampling_numpy import apply_repetition_penalty, sample_numpy
from headrace.server.types import SamplingParams

V = 50


def logits(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, (rows, V)).astype(np.float32)


def test_greedy_is_argmax_and_needs_no_generator() -> None:
    x = logits(3)
    params = [SamplingParams()] * 3
    assert make_generator(params[0]) is None
    assert sample_numpy(x, params, [None] * 3, [[]] * 3) == np.argmax(x, axis=1).tolist()
    assert sample_numpy(x[1], params[:1], [None], [[]]) == [int(np.argmax(x[1]))]  # [V] input


def test_seed_reproduces_and_neighbours_do_not_matter() -> None:
    x = logits(4)
    p = SamplingParams(temperature=1.0, seed=11)

    def draw(rows: list[int], params: list[SamplingParams]) -> list[list[int]]:
        gens = [make_generator(q) for q in params]
        return [sample_numpy(x[rows], params, gens, [[]] * len(rows)) for _ in range(20)]

    alone = [out[0] for out in draw([2], [p])]
    crowded = [
        out[1]
        for out in draw(
            [0, 2, 3],
            [SamplingParams(temperature=0.5, seed=1), p, SamplingParams(temperature=2.0)],
        )
    ]
    assert alone == crowded
    other = [out[0] for out in draw([2], [SamplingParams(temperature=1.0, seed=12)])]
    assert other != alone


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    x = logits(5, seed=3)
    best = np.argmax(x, axis=1).tolist()
    for p in (
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
    ):
        gens = [np.random.default_rng(i) for i in range(5)]
        assert sample_numpy(x, [p] * 5, gens, [[]] * 5) == best


def test_top_k_limits_the_candidates() -> None:
    x = logits(1, seed=4)[0]
    top3 = set(np.argsort(-x)[:3].tolist())
    rng = np.random.default_rng(0)
    p = SamplingParams(temperature=5.0, top_k=3)
    seen = {sample_numpy(x, [p], [rng], [[]])[0] for _ in range(200)}
    assert seen <= top3 and len(seen) > 1


def test_repetition_penalty_discourages_history() -> None:
    row = np.array([2.0, -1.0, 0.5, 1.9], dtype=np.float32)
    apply_repetition_penalty(row, [0, 1], 2.0)
    np.testing.assert_allclose(row, [1.0, -2.0, 0.5, 1.9])
    x = np.array([[3.0, 2.9, 0.0]], dtype=np.float32)
    penalised = SamplingParams(repetition_penalty=1.5)
    assert sample_numpy(x, [penalised], [None], [[0]]) == [1]
    assert x[0, 0] == 3.0  # the caller's logits are left alone


def test_sampled_frequencies_follow_the_softmax() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    x = np.log(probs).astype(np.float32)
    rng = np.random.default_rng(0)
    p = SamplingParams(temperature=1.0)
    counts = np.bincount([sample_numpy(x, [p], [rng], [[]])[0] for _ in range(4000)], minlength=4)
    np.testing.assert_allclose(counts / 4000, probs, atol=0.03)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    x = np.log(np.array([0.2, 0.5, 0.3])).astype(np.float32)
    rng = np.random.default_rng(1)
    p = SamplingParams(temperature=1.0, top_p=0.7)  # 0.5 + 0.3 reach it; 0.2 is cut
    seen = [sample_numpy(x, [p], [rng], [[]])[0] for _ in range(500)]
    assert set(seen) == {1, 2}
    assert 0.55 < seen.count(1) / 500 < 0.70  # renormalised: 0.5 / 0.8 = 0.625

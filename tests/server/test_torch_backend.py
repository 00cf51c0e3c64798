"""The torch backend on CPU against plain transformers forwards of the same tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from headrace.server.backends.base import (  # noqa: E402
    BackendSpec,
    DecoderBackend,
    EncoderBackend,
    make_generator,
)
from headrace.server.backends.registry import load_backend  # noqa: E402
from headrace.server.backends.torch_backend import TorchDecoder, TorchEncoder  # noqa: E402
from headrace.server.backends.torch_sampling import sample_torch, seeded_uniform  # noqa: E402
from headrace.server.manifest import read_manifest  # noqa: E402
from headrace.server.types import SamplingParams, Task  # noqa: E402

ATOL = 1e-5


def _spec(models: Path, name: str, task: Task, **kw: object) -> BackendSpec:
    version_dir = models / name / "1"
    return BackendSpec(
        task=task,
        backend="torch",
        path=version_dir / "hf",
        precision=str(kw.pop("precision", "fp32")),
        device=str(kw.pop("device", "cpu")),
        manifest=read_manifest(version_dir),
        version_dir=version_dir,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def decoder(tiny_models: Path) -> TorchDecoder:
    return TorchDecoder(_spec(tiny_models, "tiny-generator", Task.GENERATE, max_slots=4))


@pytest.fixture(scope="module")
def hf_lm(tiny_models: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_models / "tiny-generator/1/hf")).eval()


def _ref_last_logits(hf_lm, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return hf_lm(torch.tensor([ids])).logits[0, -1].numpy()


def _release_all(dec: TorchDecoder) -> None:
    for s in range(dec.max_slots):
        dec.release(s)


# --- encoder -----------------------------------------------------------------------------


def test_encoder_matches_transformers_and_ignores_padding(tiny_models: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    enc = load_backend(_spec(tiny_models, "tiny-classifier", Task.CLASSIFY))
    assert isinstance(enc, TorchEncoder) and isinstance(enc, EncoderBackend)
    assert (enc.name, enc.precision, enc.device) == ("torch", "fp32", "cpu")
    rng = np.random.default_rng(0)
    vocab = enc.model.config.vocab_size
    ids = rng.integers(5, vocab, size=(3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # row 1 is 7 tokens + padding
    ids[1, 7:] = 0
    out = enc.forward(ids, mask)
    assert out.shape == (3, 3) and out.dtype == np.float32
    ref_model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_models / "tiny-classifier/1/hf")
    ).eval()
    with torch.inference_mode():
        ref = ref_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        alone = ref_model(torch.from_numpy(ids[1:2, :7])).logits
    np.testing.assert_allclose(out, ref.numpy(), atol=ATOL)
    np.testing.assert_allclose(out[1], alone[0].numpy(), atol=ATOL)
    assert not np.allclose(out[0], out[2])  # different texts, different logits
    enc.close()


# --- decoder: cache correctness ----------------------------------------------------------


def test_decoder_attributes(decoder: TorchDecoder) -> None:
    assert isinstance(decoder, DecoderBackend)
    assert decoder.name == "torch" and decoder.device == "cpu" and decoder.precision == "fp32"
    assert decoder.max_slots == 4
    assert decoder.max_context == 128  # n_positions of the tiny GPT-2
    assert decoder.vocab_size == 400


def test_prefill_and_decode_match_full_forward(decoder: TorchDecoder, hf_lm) -> None:
    """Each slot at its own length, decoded together in a shuffled order, equals a
    no-cache forward of its whole sequence."""
    _release_all(decoder)
    rng = np.random.default_rng(1)
    seqs = {s: rng.integers(0, 400, size=n).tolist() for s, n in [(0, 5), (1, 2), (2, 9), (3, 1)]}
    for s, ids in seqs.items():
        got = decoder.prefill(s, ids).numpy()
        np.testing.assert_allclose(got, _ref_last_logits(hf_lm, ids), atol=ATOL)
    order = [2, 0, 3, 1]  # not the slot order: rows are gathered
    for _ in range(6):
        nxt = rng.integers(0, 400, size=len(order)).tolist()
        logits = decoder.decode(order, nxt).numpy()
        assert logits.shape == (4, 400)
        for row, s in enumerate(order):
            seqs[s].append(nxt[row])
            np.testing.assert_allclose(logits[row], _ref_last_logits(hf_lm, seqs[s]), atol=ATOL)
        order = order[1:] + order[:1]


def test_batched_decode_equals_each_slot_alone(decoder: TorchDecoder) -> None:
    _release_all(decoder)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 400, size=n).tolist() for n in (3, 8, 1, 5)]
    steps = rng.integers(0, 400, size=(5, 4)).tolist()
    for s, p in enumerate(prompts):
        decoder.prefill(s, p)
    together = [decoder.decode([0, 1, 2, 3], step).numpy().copy() for step in steps]
    for s, p in enumerate(prompts):
        decoder.release(s)
        decoder.prefill(s, p)
        for t, step in enumerate(steps):
            alone = decoder.decode([s], [step[s]]).numpy()[0]
            np.testing.assert_allclose(together[t][s], alone, atol=ATOL)


def test_greedy_matches_transformers_generate(decoder: TorchDecoder, hf_lm) -> None:
    _release_all(decoder)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 400, size=n).tolist() for n in (6, 3)]
    slots = [1, 3]
    tokens = []
    for slot, p in zip(slots, prompts, strict=True):
        logits = decoder.prefill(slot, p)
        tokens.append(decoder.sample(logits, [SamplingParams()], [None], [p]))
    for _ in range(15):
        logits = decoder.decode(slots, [t[-1] for t in tokens])
        picks = decoder.sample(logits, [SamplingParams()] * 2, [None, None], prompts)
        for t, pick in zip(tokens, picks, strict=True):
            t.append(pick)
    for p, got in zip(prompts, tokens, strict=True):
        ref = hf_lm.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[
            0, len(p) :
        ].tolist()
        assert got == ref


def test_release_then_reuse(decoder: TorchDecoder, hf_lm) -> None:
    _release_all(decoder)
    long_prompt = list(range(40, 70))
    decoder.prefill(2, long_prompt)
    decoder.decode([2], [7])
    decoder.release(2)
    with pytest.raises(ValueError, match="prefill"):
        decoder.decode([2], [7])
    short = [9, 8, 7]
    got = decoder.prefill(2, short).numpy()
    np.testing.assert_allclose(got, _ref_last_logits(hf_lm, short), atol=ATOL)
    step = decoder.decode([2], [5]).numpy()[0]  # must not see the old, longer sequence
    np.testing.assert_allclose(step, _ref_last_logits(hf_lm, [*short, 5]), atol=ATOL)


def test_context_limits(decoder: TorchDecoder) -> None:
    _release_all(decoder)
    with pytest.raises(ValueError):
        decoder.prefill(0, [])
    with pytest.raises(ValueError):
        decoder.prefill(0, [1] * 129)
    with pytest.raises(ValueError):
        decoder.prefill(4, [1])  # max_slots is 4
    decoder.prefill(0, [1] * 127)
    decoder.decode([0], [1])  # position 127: the last one
    with pytest.raises(ValueError, match="full"):
        decoder.decode([0], [1])


# --- sampling ------------------------------------------------------------------------------


def test_cpu_sample_uses_numpy_sampler_with_seeds(decoder: TorchDecoder) -> None:
    logits = torch.randn(3, 400, generator=torch.Generator().manual_seed(0))
    logits[2] = logits[0]
    p = SamplingParams(temperature=1.0, top_k=50, seed=7)
    a = decoder.sample(
        logits, [p, SamplingParams(), p], [make_generator(p), None, make_generator(p)], [[], [], []]
    )
    assert a[1] == int(logits[1].argmax())
    assert a[0] == a[2]  # same seed, same row -> same token


def test_sample_torch_greedy_topk1_and_penalty() -> None:
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    best = x.argmax(-1).tolist()
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_k=1, seed=1),
        SamplingParams(temperature=0.7, top_p=1e-6, seed=2),
        SamplingParams(),
    ]
    gens = [make_generator(p) for p in params]
    assert sample_torch(x, params, gens, [[]] * 4) == best
    # a strong penalty on the best token of row 0 moves greedy off it
    pen = [SamplingParams(repetition_penalty=1e6)] + [SamplingParams()] * 3
    got = sample_torch(x, pen, [None] * 4, [[best[0]], [], [], []])
    assert got[0] != best[0] and got[1:] == best[1:]
    assert sample_torch(x[0], [SamplingParams()], [None], [[]]) == [best[0]]


def test_sample_torch_seeded_rows_ignore_batch_mates() -> None:
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=1.5, top_p=0.9, top_k=20, seed=42)
    q = SamplingParams(temperature=1.0, seed=3)
    g1 = make_generator(p)
    seq_alone = [sample_torch(x[1:2], [p], [g1], [[]])[0] for _ in range(20)]
    g2, g3 = make_generator(p), make_generator(q)
    seq_batched = [
        sample_torch(x, [q, p, SamplingParams()], [g3, g2, None], [[], [], []])[1]
        for _ in range(20)
    ]
    assert seq_alone == seq_batched
    assert len(set(seq_alone)) > 1  # it does sample


def test_sample_torch_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = torch.log(probs)[None, :]
    p = SamplingParams(temperature=1.0, seed=0)
    g = make_generator(p)
    n = 4000
    counts = np.bincount([sample_torch(x, [p], [g], [[]])[0] for _ in range(n)], minlength=4)
    np.testing.assert_allclose(counts / n, probs.numpy(), atol=0.03)
    # top_p=0.8 keeps {0, 1} (mass before token 2 is 0.8), renormalised to 0.625 / 0.375
    p8 = SamplingParams(temperature=1.0, top_p=0.8, seed=1)
    g8 = make_generator(p8)
    counts = np.bincount([sample_torch(x, [p8], [g8], [[]])[0] for _ in range(n)], minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / n - 0.625) < 0.03


def test_seeded_uniform_is_uniform_and_row_specific() -> None:
    u = seeded_uniform(torch.tensor([1, 2], dtype=torch.int64), 20000)
    assert u.shape == (2, 20000) and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[0], u[1])
    assert torch.equal(u, seeded_uniform(torch.tensor([1, 2], dtype=torch.int64), 20000))


def test_hash_on_tensors_equals_the_host_version() -> None:
    from headrace.server.backends.torch_sampling import _mix32, _mix32_int

    x = torch.randint(
        0, 2**32, (20000,), dtype=torch.int64, generator=torch.Generator().manual_seed(4)
    )
    x[:3] = torch.tensor([0, 2**32 - 1, 2**31])
    assert _mix32(x).tolist() == [_mix32_int(v) for v in x.tolist()]  # int64 wrap keeps low bits


def test_random_slot_traffic_matches_full_forwards(decoder: TorchDecoder, hf_lm) -> None:
    """Prefills, decodes of random slot subsets and releases, in a random order, as a
    scheduler would issue them: every logit row equals a no-cache forward."""
    _release_all(decoder)
    rng = np.random.default_rng(7)
    seqs: dict[int, list[int]] = {}
    for _ in range(40):
        op = rng.random()
        free = [s for s in range(decoder.max_slots) if s not in seqs]
        if free and (op < 0.3 or not seqs):
            slot = int(rng.choice(free))
            seqs[slot] = rng.integers(0, 400, size=int(rng.integers(1, 30))).tolist()
            got = decoder.prefill(slot, seqs[slot]).numpy()
            np.testing.assert_allclose(got, _ref_last_logits(hf_lm, seqs[slot]), atol=ATOL)
        elif op < 0.4:
            slot = int(rng.choice(list(seqs)))
            decoder.release(slot)
            del seqs[slot]
        else:
            active = [s for s in seqs if len(seqs[s]) < decoder.max_context]
            if not active:
                continue
            picked = [
                int(s) for s in rng.permutation(active)[: int(rng.integers(1, len(active) + 1))]
            ]
            nxt = rng.integers(0, 400, size=len(picked)).tolist()
            logits = decoder.decode(picked, nxt).numpy()
            for row, s in enumerate(picked):
                seqs[s].append(nxt[row])
                np.testing.assert_allclose(logits[row], _ref_last_logits(hf_lm, seqs[s]), atol=ATOL)

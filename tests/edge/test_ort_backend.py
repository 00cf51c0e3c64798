"""ONNX Runtime backends: what the conformance test does not cover (options, errors, metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from headrace.edge.ort_backend import OrtDecoder, OrtEncoder, default_threads, session_options
from headrace.server.backends.base import BackendSpec, DecoderBackend, EncoderBackend
from headrace.server.backends.registry import load_backend
from headrace.server.manifest import read_manifest
from headrace.server.types import SamplingParams, Task


def _spec(version_dir: Path, task: Task, file: str = "model.onnx", **kw: Any) -> BackendSpec:
    return BackendSpec(
        task=task,
        backend="onnxruntime",
        path=version_dir / file,
        precision="int8" if "int8" in file else "fp32",
        device="cpu",
        manifest=read_manifest(version_dir),
        version_dir=version_dir,
        **kw,
    )


@pytest.fixture()
def decoder(onnx_models: Path) -> OrtDecoder:
    return OrtDecoder(_spec(onnx_models / "tiny-generator" / "1", Task.GENERATE, max_slots=3))


def test_registry_loads_both_protocols(onnx_models: Path) -> None:
    enc = load_backend(_spec(onnx_models / "tiny-classifier" / "1", Task.CLASSIFY))
    dec = load_backend(
        _spec(onnx_models / "tiny-generator" / "1", Task.GENERATE, "model.int8.onnx")
    )
    assert isinstance(enc, OrtEncoder) and isinstance(enc, EncoderBackend)
    assert isinstance(dec, OrtDecoder) and isinstance(dec, DecoderBackend)
    assert (enc.name, enc.device, dec.precision) == ("onnxruntime", "cpu", "int8")
    logits = enc.forward(np.array([[2, 10, 11, 3]]), np.ones((1, 4), dtype=np.int64))
    assert logits.shape == (1, 3) and logits.dtype == np.float32


def test_decoder_facts_come_from_graph_metadata(decoder: OrtDecoder) -> None:
    # tiny-generator: 2 layers, 2 heads, n_embd 32, vocab 400, 128 positions, eos 0
    assert (decoder.num_layers, decoder.num_heads, decoder.head_dim) == (2, 2, 16)
    assert (decoder.vocab_size, decoder.max_context, decoder.eos_token_id) == (400, 128, 0)
    assert decoder.max_slots == 3


def test_manifest_context_caps_the_graph_context(onnx_models: Path, tmp_path: Path) -> None:
    import dataclasses

    version_dir = onnx_models / "tiny-generator" / "1"
    manifest = read_manifest(version_dir)
    small = dataclasses.replace(
        manifest, generation=dataclasses.replace(manifest.generation, max_context=16)
    )
    spec = dataclasses.replace(_spec(version_dir, Task.GENERATE), manifest=small)
    dec = OrtDecoder(spec)
    assert dec.max_context == 16
    dec.prefill(0, list(range(1, 16)))  # 15 tokens
    dec.decode([0], [5])  # the 16th
    with pytest.raises(ValueError, match="full"):
        dec.decode([0], [5])
    with pytest.raises(ValueError, match="exceeds"):
        dec.prefill(1, list(range(1, 18)))
    # an option caps it further (as for the torch backend)
    for cap in (8, 1):
        capped = OrtDecoder(dataclasses.replace(spec, options={"max_context": cap}))
        assert capped.max_context == cap and capped.length(0) == 0  # warm-up released its slot


def test_decoder_rejects_misuse(decoder: OrtDecoder) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        decoder.prefill(0, [])
    with pytest.raises(ValueError, match="out of range"):
        decoder.prefill(3, [1, 2])
    with pytest.raises(ValueError, match="not prefilled"):
        decoder.decode([1], [7])
    with pytest.raises(ValueError, match="one last token per slot"):
        decoder.decode([0, 1], [7])
    decoder.prefill(0, [1, 2, 3])
    decoder.release(0)
    assert decoder.length(0) == 0
    with pytest.raises(ValueError, match="not prefilled"):
        decoder.decode([0], [7])


def test_decode_is_independent_of_batch_mates(decoder: OrtDecoder) -> None:
    """A slot's logits do not depend on which other slots share its step (padding is masked)."""
    decoder.prefill(0, [5, 6, 7, 8, 9, 10, 11])
    alone = decoder.decode([0], [12])
    decoder.release(0)
    decoder.prefill(2, [5, 6, 7, 8, 9, 10, 11])
    decoder.prefill(1, [40, 41])  # shorter: padded within the step
    decoder.prefill(0, [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70])  # longer
    together = decoder.decode([1, 2, 0], [42, 12, 71])
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)
    assert [decoder.length(s) for s in range(3)] == [12, 3, 8]


def test_decode_steps_match_each_slot_alone(decoder: OrtDecoder) -> None:
    """Steps that keep their batch (its presents are the next past) and steps that change
    it (a slot sits out, the order turns, a slot is refilled) give each slot the logits
    it gets alone."""
    prompts = {0: [5, 6, 7, 8, 9, 10, 11], 1: [40, 41], 2: [60, 61, 62, 63, 64, 65, 66, 67]}
    schedule = [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 2], [0, 1, 2], [2, 1, 0], [2, 1, 0]]

    def token(slot: int, k: int) -> int:  # the input of the slot's k-th decode
        return 100 + 7 * k + slot

    alone: dict[int, list[np.ndarray]] = {}
    for slot, prompt in prompts.items():
        decoder.prefill(0, prompt)
        runs = sum(slot in step for step in schedule)
        alone[slot] = [decoder.decode([0], [token(slot, k)])[0] for k in range(runs)]
        decoder.release(0)
    for slot, prompt in prompts.items():
        decoder.prefill(slot, prompt)
    done = dict.fromkeys(prompts, 0)
    for step in schedule:
        logits = decoder.decode(step, [token(s, done[s]) for s in step])
        for row, slot in enumerate(step):
            np.testing.assert_allclose(logits[row], alone[slot][done[slot]], atol=1e-4)
            done[slot] += 1
    assert [decoder.length(s) for s in range(3)] == [len(prompts[s]) + done[s] for s in range(3)]
    decoder.release(1)  # refilled: the kept batch must not serve its old past
    decoder.prefill(1, prompts[0])
    again = decoder.decode([2, 1, 0], [token(2, done[2]), token(0, 0), token(0, done[0])])
    np.testing.assert_allclose(again[1], alone[0][0], atol=1e-4)


def test_random_schedule_matches_each_sequence_alone(onnx_models: Path) -> None:
    """Joins, leaves, sit-outs and turned orders at random over many steps: every row of
    every step equals its sequence decoded alone (a second decoder, one slot)."""
    version = onnx_models / "tiny-generator" / "1"
    batch = OrtDecoder(_spec(version, Task.GENERATE, max_slots=4))
    alone = OrtDecoder(_spec(version, Task.GENERATE, max_slots=1))
    rng = np.random.default_rng(20261207)
    prompts: dict[int, list[int]] = {}  # sequence -> prompt
    inputs: dict[int, list[int]] = {}  # sequence -> the tokens decoded so far
    held: dict[int, int] = {}  # slot -> sequence
    reference: dict[tuple[int, int], np.ndarray] = {}  # (sequence, k) -> k-th decode's logits

    def expected(seq: int, k: int) -> np.ndarray:
        if (seq, k) not in reference:
            alone.prefill(0, prompts[seq])
            for j, token in enumerate(inputs[seq][: k + 1]):
                reference[seq, j] = alone.decode([0], [token])[0]
            alone.release(0)
        return reference[seq, k]

    for step in range(40):
        for slot in range(4):  # fill free slots now and then, end a sequence now and then
            if slot not in held and rng.random() < 0.5:
                seq = len(prompts)
                prompts[seq] = rng.integers(5, 60, int(rng.integers(1, 12))).tolist()
                inputs[seq] = []
                batch.prefill(slot, prompts[seq])
                held[slot] = seq
            elif slot in held and (rng.random() < 0.1 or len(inputs[held[slot]]) >= 20):
                batch.release(slot)
                del held[slot]
        slots = [s for s in held if rng.random() < 0.85]  # some sit this step out
        if not slots:
            continue
        rng.shuffle(slots)
        tokens = rng.integers(5, 60, len(slots)).tolist()
        for slot, token in zip(slots, tokens, strict=True):
            inputs[held[slot]].append(token)
        logits = batch.decode(slots, tokens)
        for row, slot in enumerate(slots):
            seq = held[slot]
            want = expected(seq, len(inputs[seq]) - 1)
            np.testing.assert_allclose(logits[row], want, atol=1e-4, err_msg=f"step {step}")
    assert len(prompts) > 8  # the schedule did join and leave


def test_sample_uses_numpy_sampling(decoder: OrtDecoder) -> None:
    logits = decoder.prefill(0, [1, 2, 3])
    greedy = decoder.sample(logits, [SamplingParams()], [None], [[1, 2, 3]])
    assert greedy == [int(np.argmax(logits))]
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [
        decoder.sample(logits, [params], [np.random.default_rng(7)], [[1, 2, 3]]) for _ in range(2)
    ]
    assert draws[0] == draws[1] and 0 <= draws[0][0] < decoder.vocab_size


def test_session_options_from_spec() -> None:
    opts = session_options(
        {
            "intra_op_threads": 3,
            "inter_op_threads": 2,
            "graph_optimization_level": "basic",
            "enable_cpu_mem_arena": False,
            "allow_spinning": False,
        }
    )
    import onnxruntime as ort

    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (3, 2)
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert opts.enable_cpu_mem_arena is False
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    defaults = session_options({})
    assert defaults.intra_op_num_threads == default_threads() >= 1
    assert defaults.inter_op_num_threads == 1
    assert defaults.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = session_options({"allow_spinning": True})  # ORT's own default: no entry
    with pytest.raises(RuntimeError, match="allow_spinning"):
        spinning.get_session_config_entry("session.intra_op.allow_spinning")
    with pytest.raises(ValueError, match="graph_optimization_level"):
        session_options({"graph_optimization_level": "fastest"})


def test_encoder_errors(onnx_models: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        OrtEncoder(_spec(onnx_models / "tiny-classifier" / "1", Task.CLASSIFY, "nope.onnx"))
    # a decoder graph is not an encoder graph
    spec = _spec(onnx_models / "tiny-classifier" / "1", Task.CLASSIFY)
    import dataclasses

    wrong = dataclasses.replace(spec, path=onnx_models / "tiny-generator" / "1" / "model.onnx")
    with pytest.raises(ValueError, match="not an encoder graph"):
        OrtEncoder(wrong)
    with pytest.raises(ValueError, match="lacks decoder metadata"):
        OrtDecoder(dataclasses.replace(spec, task=Task.GENERATE))


def test_generate_models_get_their_own_intra_op_threads(onnx_models: Path, tmp_path: Path) -> None:
    """`decoder_intra_op_threads` reaches the generator's ORT session through the real
    config and repository; the classifier keeps `intra_op_threads`."""
    import asyncio

    from headrace.server.config import load_config
    from headrace.server.models import ClassifierModel, GeneratorModel
    from headrace.server.repository import ModelRepository

    path = tmp_path / "edge.toml"
    path.write_text('profile = "edge"\nintra_op_threads = 2\ndecoder_intra_op_threads = 1\n')
    config = load_config(path, {"models": onnx_models, "poll_interval_s": 0.0})

    async def threads() -> dict[str, int]:
        repo = ModelRepository.from_config(config)
        await repo.start()
        try:
            found = {}
            models = (("tiny-classifier", ClassifierModel), ("tiny-generator", GeneratorModel))
            for name, kind in models:
                backend: Any = repo.get(name, None, kind).backend
                found[name] = backend._session.get_session_options().intra_op_num_threads
            return found
        finally:
            await repo.stop()

    assert asyncio.run(threads()) == {"tiny-classifier": 2, "tiny-generator": 1}

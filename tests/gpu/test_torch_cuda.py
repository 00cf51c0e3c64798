"""The torch backend on CUDA against its CPU reference (fp32 and fp16), CUDA graphs
against eager, and the batched sampler on the GPU. Skipped where CUDA is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA (torch.cuda.is_available() is False here)", allow_module_level=True)

from headrace.server.backends.base import BackendSpec, make_generator  # noqa: E402
from headrace.server.backends.torch_backend import TorchDecoder, TorchEncoder  # noqa: E402
from headrace.server.backends.torch_sampling import sample_torch  # noqa: E402
from headrace.server.manifest import read_manifest  # noqa: E402
from headrace.server.types import SamplingParams, Task  # noqa: E402

pytestmark = pytest.mark.gpu


def _spec(models: Path, name: str, task: Task, **kw: object) -> BackendSpec:
    version_dir = models / name / "1"
    return BackendSpec(
        task=task,
        backend="torch",
        path=version_dir / "hf",
        precision=str(kw.pop("precision", "fp32")),
        device=str(kw.pop("device", "cuda")),
        manifest=read_manifest(version_dir),
        version_dir=version_dir,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 2e-2), ("bf16", 1e-1)])
def test_encoder_cuda_matches_cpu(tiny_models: Path, precision: str, atol: float) -> None:
    cpu = TorchEncoder(_spec(tiny_models, "tiny-classifier", Task.CLASSIFY, device="cpu"))
    gpu = TorchEncoder(_spec(tiny_models, "tiny-classifier", Task.CLASSIFY, precision=precision))
    assert gpu.device.startswith("cuda") and gpu.precision == precision
    rng = np.random.default_rng(0)
    ids = rng.integers(5, cpu.model.config.vocab_size, size=(16, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[3, 9:] = 0
    ref, got = cpu.forward(ids, mask), gpu.forward(ids, mask)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=atol)
    if precision == "fp32":
        assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_encoder_cuda_graphs_match_eager(tiny_models: Path, precision: str, atol: float) -> None:
    def enc(graphs: bool) -> TorchEncoder:
        return TorchEncoder(_spec(tiny_models, "tiny-classifier", Task.CLASSIFY,
                                  precision=precision, options={"cuda_graphs": graphs}))  # fmt: skip

    eager, graphed = enc(False), enc(True)
    assert eager.graphs is None and graphed.graphs is not None
    rng = np.random.default_rng(5)
    vocab = eager.model.config.vocab_size
    for batch, seq in [(1, 5), (3, 33), (16, 64), (7, 1), (40, 20)]:  # 40 > max_batch 16: eager
        ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, max(1, seq // 2) :] = 0
        np.testing.assert_allclose(graphed.forward(ids, mask), eager.forward(ids, mask), atol=atol)
    assert (16, 64) in graphed.graphs.graphs and (4, 64) in graphed.graphs.graphs
    assert not any(b > 16 for b, _ in graphed.graphs.graphs)


def _run_decoder(dec: TorchDecoder, prompts: list[list[int]], feed: list[list[int]]) -> list:
    """Prefill slot i with prompts[i], then decode feed[t] in slots 3, 0, 2, 1 order."""
    for s in range(dec.max_slots):
        dec.release(s)
    outs = [dec.prefill(s, p).float().cpu().numpy() for s, p in enumerate(prompts)]
    order = [s for s in (3, 0, 2, 1) if s < len(prompts)]
    for step in feed:
        outs.append(dec.decode(order, step[: len(order)]).float().cpu().numpy())
    return outs


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 3e-2)])
def test_decoder_cuda_matches_cpu(tiny_models: Path, precision: str, atol: float) -> None:
    cpu = TorchDecoder(_spec(tiny_models, "tiny-generator", Task.GENERATE, device="cpu"))
    gpu = TorchDecoder(_spec(tiny_models, "tiny-generator", Task.GENERATE, precision=precision))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 400, size=n).tolist() for n in (7, 2, 30, 12)]
    feed = rng.integers(0, 400, size=(70, 4)).tolist()  # crosses the 64-key bucket
    for a, b in zip(
        _run_decoder(cpu, prompts, feed), _run_decoder(gpu, prompts, feed), strict=True
    ):
        np.testing.assert_allclose(b, a, atol=atol)


def test_cuda_graphs_match_eager(tiny_models: Path) -> None:
    eager = TorchDecoder(
        _spec(
            tiny_models,
            "tiny-generator",
            Task.GENERATE,
            max_slots=8,
            options={"cuda_graphs": False},
        )
    )
    assert eager.graphs is None
    graphs = TorchDecoder(
        _spec(
            tiny_models,
            "tiny-generator",
            Task.GENERATE,
            max_slots=8,
            options={"cuda_graphs": True, "graph_buckets": [1, 2, 4]},
        )
    )
    assert graphs.graphs is not None and (4, 65) not in graphs.graphs.graphs
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 400, size=n).tolist() for n in (5, 40, 1)]  # 3 rows: bucket 4
    feed = rng.integers(0, 400, size=(80, 3)).tolist()  # 40 + 80 < 128
    for a, b in zip(
        _run_decoder(eager, prompts, feed), _run_decoder(graphs, prompts, feed), strict=True
    ):
        np.testing.assert_allclose(b, a, atol=1e-4)
    assert {b for b, _ in graphs.graphs.graphs} <= {1, 2, 4, 8}
    assert len(graphs.graphs.graphs) >= 2  # more than one key-length bucket was used


def test_greedy_generation_cuda_equals_transformers(tiny_models: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models / "tiny-generator/1/hf")).eval()
    dec = TorchDecoder(
        _spec(tiny_models, "tiny-generator", Task.GENERATE, options={"cuda_graphs": True})
    )
    prompt = [17, 3, 99, 250, 4]
    p = SamplingParams()
    tokens = dec.sample(dec.prefill(2, prompt), [p], [None], [prompt])
    for _ in range(20):
        tokens += dec.sample(dec.decode([2], tokens[-1:]), [p], [None], [prompt])
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=21, do_sample=False, pad_token_id=0)
    assert tokens == ref[0, len(prompt) :].tolist()


def test_sampler_on_gpu_matches_cpu_and_is_seeded() -> None:
    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(3))
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=40, seed=1),
        SamplingParams(temperature=1.2, top_p=0.9, seed=2),
        SamplingParams(temperature=1.0, top_k=100, top_p=0.95, repetition_penalty=1.3, seed=3),
        SamplingParams(repetition_penalty=2.0),
    ]
    hist = [[], [1, 2], [], [int(x[3].argmax()), 5], [int(x[4].argmax())]]
    on_cpu = sample_torch(x, params, [make_generator(p) for p in params], hist)
    on_gpu = sample_torch(x.cuda(), params, [make_generator(p) for p in params], hist)
    assert on_gpu[0] == on_cpu[0] == int(x[0].argmax())
    assert on_gpu[4] == on_cpu[4] != int(x[4].argmax())
    assert on_gpu == on_cpu


def test_graph_capture_while_another_model_runs(tiny_models: Path) -> None:
    """A new encoder shape is captured while a decoder steps in another thread (as when a
    model version loads beside a serving one): neither fails, results stay right."""
    import threading

    enc = TorchEncoder(_spec(tiny_models, "tiny-classifier", Task.CLASSIFY))
    ref = TorchEncoder(_spec(tiny_models, "tiny-classifier", Task.CLASSIFY,
                             options={"cuda_graphs": False}))  # fmt: skip
    dec = TorchDecoder(_spec(tiny_models, "tiny-generator", Task.GENERATE,
                             options={"cuda_graphs": False}))  # fmt: skip
    stop, errors = threading.Event(), []

    def decode_loop() -> None:
        try:
            while not stop.is_set():
                dec.release(0)
                logits = dec.prefill(0, [1, 2, 3])
                for _ in range(20):
                    logits = dec.decode([0], [int(logits.reshape(-1, 400)[0].argmax())])
        except Exception as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=decode_loop)
    worker.start()
    try:
        rng = np.random.default_rng(6)
        for batch, seq in [(2, 40), (5, 70), (9, 100), (1, 128)]:  # each a new graph
            ids = rng.integers(5, 200, size=(batch, seq)).astype(np.int64)
            mask = np.ones_like(ids)
            np.testing.assert_allclose(enc.forward(ids, mask), ref.forward(ids, mask), atol=1e-4)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors

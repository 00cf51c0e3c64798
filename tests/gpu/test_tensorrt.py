"""TensorRT: engine build and the TensorRT backends against the torch reference.

The build/serve tests run only where `tensorrt` and CUDA are both present; the checks
of the command line and of the profile layout run everywhere.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from headrace.build.engine import decoder_profiles, encoder_profiles
from headrace.server.backends.base import BackendSpec, BackendUnavailable
from headrace.server.backends.registry import load_backend
from headrace.server.manifest import read_manifest
from headrace.server.types import SamplingParams, Task


def _have_trt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import tensorrt

    return hasattr(tensorrt, "Builder")  # not a stubs-only folder


HAVE_TRT = _have_trt()


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


needs_trt = pytest.mark.skipif(
    not (HAVE_TRT and _cuda()),
    reason="needs the tensorrt package and an NVIDIA GPU with CUDA (missing here)",
)


def test_encoder_profiles_cover_every_batch_once() -> None:
    profiles = encoder_profiles(max_batch=64, max_seq=128, opt_seq=64)
    ranges = [(p["input_ids"][0][0], p["input_ids"][2][0]) for p in profiles]
    assert ranges == [(1, 8), (9, 32), (33, 64)]
    for p in profiles:
        lo, opt, hi = p["input_ids"]
        assert lo[1] == 1 and opt[1] == 64 and hi[1] == 128
        assert p["attention_mask"] == p["input_ids"]
    assert [p["input_ids"][2][0] for p in encoder_profiles(4, 32, 64)] == [4]


def test_decoder_profiles_prefill_then_decode() -> None:
    prefill, decode = decoder_profiles(max_batch=32, max_context=512, layers=2, heads=4,
                                       head_dim=16)  # fmt: skip
    assert prefill["past_key_values.1.value"] == ((1, 4, 0, 16),) * 3
    assert prefill["input_ids"][2] == (1, 512)
    assert decode["input_ids"] == ((1, 1), (16, 1), (32, 1))
    assert decode["past_key_values.0.key"][2] == (32, 4, 511, 16)
    # attention_mask covers past + new tokens
    assert decode["attention_mask"][2] == (32, 512) and prefill["attention_mask"][0] == (1, 1)


@pytest.mark.skipif(HAVE_TRT and _cuda(), reason="checks the message where TensorRT is missing")
def test_build_engine_without_tensorrt_says_so_in_one_line(model_repo: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "headrace.build", "engine", str(model_repo / "tiny-classifier/1")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("headrace build engine: ")
    assert "tensorrt" in lines[0].lower() or "gpu" in lines[0].lower()


@pytest.mark.skipif(HAVE_TRT and _cuda(), reason="checks the error where TensorRT is missing")
def test_tensorrt_backend_unavailable_is_a_clear_error(tiny_models: Path) -> None:
    version = tiny_models / "tiny-classifier/1"
    spec = BackendSpec(Task.CLASSIFY, "tensorrt", version / "model.plan", "fp16", "cuda:0",
                       read_manifest(version), version)  # fmt: skip
    with pytest.raises(BackendUnavailable, match=r"tensorrt|GPU|CUDA"):
        load_backend(spec)


# --- where TensorRT runs --------------------------------------------------------------------


@needs_trt
@pytest.mark.tensorrt
def test_encoder_engine_matches_torch(model_repo: Path) -> None:
    from headrace.build.engine import build_version_engine
    from headrace.server.backends.tensorrt_backend import TrtEncoder
    from headrace.server.backends.torch_backend import TorchEncoder

    version = model_repo / "tiny-classifier/1"
    facts = build_version_engine(version, precision="fp16", max_batch=16)
    manifest = read_manifest(version)
    art = manifest.artifact("tensorrt")
    assert art is not None and art.extra["gpu"] == facts["gpu"] and len(art.extra["profiles"]) == 2
    trt_enc = TrtEncoder(BackendSpec(Task.CLASSIFY, "tensorrt", version / art.path, "fp16",
                                     "cuda:0", manifest, version))  # fmt: skip
    ref = TorchEncoder(BackendSpec(Task.CLASSIFY, "torch", version / "hf", "fp32", "cpu",
                                   manifest, version))  # fmt: skip
    rng = np.random.default_rng(0)
    for batch in (1, 5, 12, 40):  # 40 > max_batch: split across calls
        ids = rng.integers(5, ref.model.config.vocab_size, size=(batch, 24)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, 10:] = 0
        got, want = trt_enc.forward(ids, mask), ref.forward(ids, mask)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=3e-2)


@needs_trt
@pytest.mark.tensorrt
def test_decoder_engine_greedy_matches_torch(model_repo: Path) -> None:
    from headrace.build.engine import build_version_engine
    from headrace.build.export import export_version
    from headrace.server.backends.tensorrt_backend import TrtDecoder
    from headrace.server.backends.torch_backend import TorchDecoder

    version = model_repo / "tiny-generator/1"
    export_version(version, int8=False)
    build_version_engine(version, precision="fp16", max_batch=8)
    manifest = read_manifest(version)
    art = manifest.artifact("tensorrt")
    assert art is not None
    trt_dec = TrtDecoder(BackendSpec(Task.GENERATE, "tensorrt", version / art.path, "fp16",
                                     "cuda:0", manifest, version, max_slots=4))  # fmt: skip
    ref = TorchDecoder(BackendSpec(Task.GENERATE, "torch", version / "hf", "fp32", "cpu",
                                   manifest, version, max_slots=4))  # fmt: skip
    prompts = [[5, 6, 7, 8], [30, 31], [100, 2, 3, 4, 5, 6, 7]]
    for dec in (trt_dec, ref):
        p = SamplingParams()
        got = [dec.sample(dec.prefill(s, pr), [p], [None], [pr]) for s, pr in enumerate(prompts)]
        for _ in range(12):
            logits = dec.decode([2, 0, 1], [got[2][-1], got[0][-1], got[1][-1]])
            picks = dec.sample(logits, [p] * 3, [None] * 3, [[], [], []])
            for row, s in enumerate((2, 0, 1)):
                got[s].append(picks[row])
        dec.tokens = got  # type: ignore[attr-defined]
    assert trt_dec.tokens == ref.tokens  # type: ignore[attr-defined]
    shutil.rmtree(version)

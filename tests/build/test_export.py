"""ONNX export and int8 quantization of the tiny checkpoints, checked against torch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from headrace.build.export import export_decoder, export_encoder, past_names, present_names
from headrace.build.quantize import quantize_int8
from headrace.server.manifest import read_manifest


def _ops(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("optimize", [True, False])
def test_export_encoder(tiny_models: Path, tmp_path: Path, optimize: bool) -> None:
    out = tmp_path / "model.onnx"
    report = export_encoder(tiny_models / "tiny-classifier" / "1" / "hf", out, optimize=optimize)
    assert report["max_abs_diff"] <= 1e-4 and report["labels_match"]
    assert report["optimized"] is optimize and Path(report["path"]) == out
    assert not (tmp_path / "model.raw.onnx").exists()
    ops = _ops(out)
    # the BERT optimizer fuses attention only on an eager, legacy export
    assert (ops["Attention"] == 2) is optimize
    meta = _meta(out)
    assert meta["headrace.kind"] == "encoder"
    assert meta["labels"] == '["negative", "neutral", "positive"]'
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    for batch, seq in [(1, 3), (5, 40)]:  # both axes are dynamic
        ids = np.full((batch, seq), 7, dtype=np.int64)
        (logits,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert logits.shape == (batch, 3)


def test_export_decoder(tiny_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "decoder.onnx"
    report = export_decoder(tiny_models / "tiny-generator" / "1" / "hf", out)
    assert report["max_abs_diff"] <= 1e-4
    assert report["greedy_match"] == "64/64" and report["greedy_identical"]
    meta = _meta(out)
    assert {k: meta[k] for k in ("num_layers", "num_heads", "head_dim", "vocab_size")} == {
        "num_layers": "2",
        "num_heads": "2",
        "head_dim": "16",
        "vocab_size": "400",
    }
    assert (meta["max_context"], meta["eos_token_id"], meta["headrace.kind"]) == (
        "128",
        "0",
        "decoder",
    )
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    assert inputs == ["input_ids", "attention_mask", "position_ids", *past_names(2)]
    assert [o.name for o in sess.get_outputs()] == ["logits", *present_names(2)]
    # prefill of 2 sequences with a zero-length past: presents grow by the input length
    feeds = {n: np.zeros((2, 2, 0, 16), dtype=np.float32) for n in past_names(2)}
    feeds["input_ids"] = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    feeds["attention_mask"] = np.ones((2, 3), dtype=np.int64)
    feeds["position_ids"] = np.array([[0, 1, 2]] * 2, dtype=np.int64)
    logits, *presents = sess.run(None, feeds)
    assert logits.shape == (2, 400)
    assert all(p.shape == (2, 2, 3, 16) for p in presents)


def test_quantize_fused_encoder_and_decoder(onnx_models: Path) -> None:
    """onnx_models ran export_version: fused encoder and decoder, both quantized."""
    for name in ("tiny-classifier", "tiny-generator"):
        version_dir = onnx_models / name / "1"
        fp32, q8 = version_dir / "model.onnx", version_dir / "model.int8.onnx"
        assert q8.stat().st_size < fp32.stat().st_size
        assert _ops(q8)["MatMulInteger"] + _ops(q8)["QAttention"] > 0
        meta = _meta(q8)
        assert meta["precision"] == "int8"
        assert meta["headrace.kind"] == _meta(fp32)["headrace.kind"]
        manifest = read_manifest(version_dir)
        onnx_arts = [
            (a.path, a.precision) for a in manifest.artifacts if a.backend == "onnxruntime"
        ]
        assert onnx_arts == [("model.int8.onnx", "int8"), ("model.onnx", "fp32")]
        assert manifest.artifact("torch") is not None
    assert _ops(onnx_models / "tiny-classifier" / "1" / "model.int8.onnx")["QAttention"] == 2


def test_quantize_reports_sizes(onnx_models: Path, tmp_path: Path) -> None:
    src = onnx_models / "tiny-classifier" / "1" / "model.onnx"
    report = quantize_int8(src, tmp_path / "q.onnx", per_channel=False)
    assert report["src_bytes"] == src.stat().st_size
    assert report["dst_bytes"] == (tmp_path / "q.onnx").stat().st_size
    assert 0 < report["ratio"] < 1 and report["per_channel"] is False

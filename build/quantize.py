"""int8 forms of an ONNX graph: dynamic (weights int8, activations quantized at run time) and
static (QDQ: activation scales fixed by calibration on training texts).

Build-time only; the edge runtime just loads the result.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def _carry_metadata(src: Path, dst: Path, how: str) -> Any:
    """Copy `src`'s metadata_props (the edge backends read them) onto `dst`, plus the
    precision and how it was quantised; returns the loaded `dst`."""
    import onnx

    source = onnx.load(str(src), load_external_data=False)
    result = onnx.load(str(dst))
    present = {p.key for p in result.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in present:
            result.metadata_props.add(key=prop.key, value=prop.value)
    result.metadata_props.add(key="precision", value="int8")
    result.metadata_props.add(key="quantization", value=how)
    onnx.save(result, str(dst))
    return result


def quantize_int8(src: Path, dst: Path, *, per_channel: bool = True) -> dict[str, Any]:
    """Write an int8 copy of `src` to `dst`; returns sizes and the time it took.

    Metadata props of `src` are carried over (the edge backends read them).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        # A graph fused by ORT's optimizer (Attention, SkipLayerNormalization...) lacks
        # type info for some weights; without this the quantizer fails on them.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    _carry_metadata(src, dst, "dynamic")
    src_bytes, dst_bytes = src.stat().st_size, dst.stat().st_size
    return {
        "path": str(dst),
        "src_bytes": src_bytes,
        "dst_bytes": dst_bytes,
        "ratio": round(dst_bytes / src_bytes, 3),
        "per_channel": per_channel,
        "seconds": round(time.perf_counter() - start, 2),
    }


class _TextReader:
    """ONNX Runtime calibration reader: padded batches of token rows, all one shape (the
    percentile calibrator stacks its samples), as (input_ids, attention_mask) int64 [B, L]."""

    def __init__(self, rows: list[list[int]], batch: int = 16, length: int = 64) -> None:
        self.batches = [rows[i : i + batch] for i in range(0, len(rows), batch)]
        self.length = length
        self.i = 0

    def get_next(self) -> dict[str, Any] | None:
        import numpy as np

        if self.i >= len(self.batches):
            return None
        rows = self.batches[self.i]
        self.i += 1
        ids = np.zeros((len(rows), self.length), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, row in enumerate(rows):
            row = row[: self.length]
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def rewind(self) -> None:
        self.i = 0


def quantize_static_qdq(
    src: Path,
    dst: Path,
    tokenizer_json: Path,
    texts: list[str],
    *,
    max_len: int = 128,
    method: str = "percentile",
    per_channel: bool = True,
) -> dict[str, Any]:
    """Static int8 in QDQ form: weights and activations int8 with symmetric scales fixed by
    calibration on `texts` (a sample of the training split), as explicit QuantizeLinear /
    DequantizeLinear pairs around MatMul and Gather.

    `src` should be a plain export (standard ONNX operators): the same file then serves
    ONNX Runtime (which fuses the pairs into integer kernels at load) and a strongly typed
    TensorRT int8 engine (which reads the scales from the pairs; symmetric, zero point 0,
    as TensorRT requires). `method`: "minmax" or "percentile" (99.999th, clips outliers)."""
    from headrace.build.training import encode_texts, load_tokenizer
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tok = load_tokenizer(tokenizer_json, max_len=max_len)
    rows = encode_texts(tok, texts)
    rows = rows[: len(rows) - len(rows) % 16] or rows  # whole batches: one shape throughout
    length = min(max_len, max(len(r) for r in rows))
    prepared = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(prepared), skip_optimization=False, skip_symbolic_shape=True)
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    quantize_static(
        str(prepared),
        str(dst),
        _TextReader(rows, 16 if len(rows) >= 16 else len(rows), length),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gather"],
        per_channel=per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=calibrate[method],
        extra_options={
            "ActivationSymmetric": True,  # zero point 0: what TensorRT's explicit int8 takes
            "WeightSymmetric": True,
            "CalibPercentile": 99.999,
        },
    )
    prepared.unlink(missing_ok=True)
    result = _carry_metadata(src, dst, "static-qdq")
    qdq = sum(n.op_type == "QuantizeLinear" for n in result.graph.node)
    return {
        "path": str(dst),
        "src_bytes": src.stat().st_size,
        "dst_bytes": dst.stat().st_size,
        "ratio": round(dst.stat().st_size / src.stat().st_size, 3),
        "calibration_texts": len(rows),
        "calibration": method,
        "quantize_nodes": qdq,
        "seconds": round(time.perf_counter() - start, 2),
    }

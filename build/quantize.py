"""Dynamic int8 quantization of an ONNX graph (weights int8, activations quantized at run time).

Build-time only; the edge runtime just loads the result.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


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
    source = onnx.load(str(src), load_external_data=False)
    result = onnx.load(str(dst))
    present = {p.key for p in result.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in present:
            result.metadata_props.add(key=prop.key, value=prop.value)
    entry = result.metadata_props.add()
    entry.key, entry.value = "precision", "int8"
    onnx.save(result, str(dst))
    src_bytes, dst_bytes = src.stat().st_size, dst.stat().st_size
    return {
        "path": str(dst),
        "src_bytes": src_bytes,
        "dst_bytes": dst_bytes,
        "ratio": round(dst_bytes / src_bytes, 3),
        "per_channel": per_channel,
        "seconds": round(time.perf_counter() - start, 2),
    }

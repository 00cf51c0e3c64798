"""The TensorRT engine build without a GPU: the graphs it builds from (their types are the
engine's precision), no API that TensorRT 11 removed, and the type check against the real
API's stubs actually biting (`make typecheck` runs mypy on build/engine.py with them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from headrace.build.engine import engine_onnx

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / ".cache" / "typestubs"

# removed in TensorRT 11 (the 10.x -> 11.x Python API migration guide)
REMOVED_FLAGS = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"}  # fmt: skip
REMOVED = {
    "int8_calibrator", "set_calibration_profile", "get_calibration_profile",
    "set_quantization_flag", "get_quantization_flag", "quantization_flags",
    "IInt8Calibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
    "platform_has_fast_fp16", "platform_has_fast_int8", "device_memory_size",
}  # fmt: skip


def removed_apis(source: str) -> set[str]:
    """Attributes of `source` that TensorRT 11 no longer has (BuilderFlag.X, the calibrators)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        owner = (
            node.value.attr
            if isinstance(node.value, ast.Attribute)
            else getattr(node.value, "id", "")
        )
        if node.attr in REMOVED or (owner == "BuilderFlag" and node.attr in REMOVED_FLAGS):
            found.add(f"{owner}.{node.attr}")
    return found


@pytest.mark.parametrize(
    "path", ["build/engine.py", "server/backends/tensorrt_backend.py"], ids=lambda p: p
)
def test_tensorrt_code_uses_no_api_removed_in_11(path: str) -> None:
    found = removed_apis((ROOT / path).read_text())
    assert not found, f"{path} uses APIs TensorRT 11 removed: {found}"


def test_the_removed_api_check_sees_them() -> None:
    source = (
        "config.set_flag(trt.BuilderFlag.FP16)\nconfig.int8_calibrator = c\nx = trt.DataType.INT8\n"
    )
    assert removed_apis(source) == {"BuilderFlag.FP16", "config.int8_calibrator"}


def _floats(model: onnx.ModelProto) -> set[int]:
    types = {i.data_type for i in model.graph.initializer}
    types |= {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    return types & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}


def test_fp16_engine_graph_is_fp16_throughout(tiny_models: Path, tmp_path: Path) -> None:
    path = engine_onnx(tiny_models / "tiny-classifier" / "1", "fp16", tmp_path)
    model = onnx.load(str(path))
    assert _floats(model) == {onnx.TensorProto.FLOAT16}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no ORT contrib ops


def test_fp16_decoder_graph_has_fp16_kv(tiny_models: Path, tmp_path: Path) -> None:
    path = engine_onnx(tiny_models / "tiny-generator" / "1", "fp16", tmp_path)
    model = onnx.load(str(path))
    kv = [v for v in model.graph.input if v.name.startswith("past_key_values.")]
    assert kv and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in kv)


def test_int8_engine_graph_is_calibrated_symmetric_qdq(tiny_models: Path, tmp_path: Path) -> None:
    import numpy as np
    from onnx import numpy_helper

    path = engine_onnx(tiny_models / "tiny-classifier" / "1", "int8", tmp_path, calib_texts=32)
    model = onnx.load(str(path))
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize, "no Q/DQ pairs: TensorRT would build a fp32 engine"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in quantize:  # TensorRT's explicit int8: int8, zero point 0
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any()
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}


def test_decoder_int8_engine_is_refused_in_words(tiny_models: Path, tmp_path: Path) -> None:
    from headrace.build.engine import EngineBuildError

    with pytest.raises(EngineBuildError, match="classifiers only"):
        engine_onnx(tiny_models / "tiny-generator" / "1", "int8", tmp_path)


@pytest.mark.skipif(not (STUBS / "tensorrt").is_dir(), reason="run `make typestubs` first")
def test_type_check_against_the_stubs_catches_a_wrong_call(tmp_path: Path) -> None:
    snippet = tmp_path / "wrong.py"
    snippet.write_text(
        "import tensorrt as trt\n"
        "flag = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED\n"
        "builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
        "builder.create_network('strongly typed')\n"  # an int is wanted
    )
    env = {**os.environ, "MYPYPATH": str(STUBS)}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
         "--config-file", str(ROOT / "pyproject.toml"), str(snippet)],
        capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'Argument 1 to "create_network"' in done.stdout, done.stdout
    assert "wrong.py:2" not in done.stdout  # the real flag type-checks

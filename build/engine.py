"""`headrace build engine`: ONNX -> serialized TensorRT engine, listed in the manifest.

    headrace build engine models/sentiment/1 --precision fp16
    headrace build engine models/sentiment/1 --precision int8     # the calibrated Q/DQ graph
    headrace build engine models/tweetgpt/1 --max-batch 64

Strongly typed networks only (TensorRT 10.x and 11.x): the engine's precision is the
precision of the ONNX graph it is built from, never a builder flag. TensorRT 11 removed
`BuilderFlag.FP16`/`INT8` and `IBuilderConfig.int8_calibrator`; on 10.x the
`STRONGLY_TYPED` creation flag asks for the same behaviour (11.x accepts and ignores it),
so one code path serves both. The graphs (`engine_onnx`):

- fp32: a plain export of the version's model (standard ONNX operators: ONNX Runtime's
  fused contrib operators are not TensorRT operators);
- fp16: the same export with the model cast to fp16 before tracing, so every float
  tensor in the graph is fp16 (for a decoder, the past/present KV tensors too: half the
  KV-cache memory);
- int8 (encoders): the static-int8 Q/DQ graph the build pipeline calibrated on a sample of
  the training split (`model.qdq.onnx`, symmetric int8 scales), the very file ONNX
  Runtime serves; one is calibrated here from the version's split.json if it has none.

Encoder: one optimisation profile per batch bucket (1-8, 9-32, 33-max) over sequence
lengths 1..max_input_tokens. Decoder: the KV-cache graph of build/export.py, two profiles:
prefill (batch 1, past 0, prompt 1..max_context) and decode (batch 1..max, one token,
past 1..max_context-1).

The engine is tied to the GPU model and the TensorRT version that built it: both go into
the artifact's `extra` (with the profiles and the precision), and the datacenter profile
serves the engine only on the same GPU model (server/repository.py), else the torch form.

Where tensorrt or an NVIDIA GPU is missing the command prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENGINE_NAME = "model.plan"
ENCODER_BATCH_BUCKETS = (8, 32)  # profile upper bounds below max_batch
PRECISIONS = ("fp32", "fp16", "int8")


class EngineBuildError(RuntimeError):
    """The engine could not be built (the message says why, in one line)."""


def require_runtime() -> None:
    """Raise EngineBuildError unless the TensorRT builder and a CUDA GPU are here."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineBuildError(
            "tensorrt is not installed here: `pip install tensorrt` on a machine with an "
            "NVIDIA GPU, then run this command there"
        ) from None
    if not hasattr(trt, "Builder"):
        raise EngineBuildError("the installed `tensorrt` package has no builder (stubs only?)")
    try:
        import torch
    except ImportError:
        raise EngineBuildError("building an engine needs torch (with CUDA) too") from None
    if not torch.cuda.is_available():
        raise EngineBuildError(
            "no NVIDIA GPU with CUDA is visible here: engines are built on "
            "the GPU model that will serve them"
        )


def tensorrt_major(version: str) -> int:
    """'10.13.0.35' -> 10. Engines are built the same way from 10.0 on (strongly typed)."""
    return int(version.split(".", 1)[0])


def encoder_profiles(max_batch: int, max_seq: int, opt_seq: int) -> list[dict[str, Any]]:
    """Batch buckets -> [{"input_ids": (min, opt, max)}, ...] for both [B, S] inputs."""
    bounds = [b for b in ENCODER_BATCH_BUCKETS if b < max_batch] + [max_batch]
    profiles, lo = [], 1
    opt_seq = min(opt_seq, max_seq)
    for hi in bounds:
        shapes = ((lo, 1), (hi, opt_seq), (hi, max_seq))
        profiles.append({"input_ids": shapes, "attention_mask": shapes})
        lo = hi + 1
    return profiles


def decoder_profiles(
    max_batch: int, max_context: int, layers: int, heads: int, head_dim: int
) -> list[dict[str, Any]]:
    """Profile 0 = prefill (batch 1, empty past), profile 1 = decode (one new token)."""

    def profile(
        b: tuple[int, int, int], s: tuple[int, int, int], p: tuple[int, int, int]
    ) -> dict[str, Any]:
        shapes: dict[str, Any] = {
            "input_ids": tuple((b[i], s[i]) for i in range(3)),
            "position_ids": tuple((b[i], s[i]) for i in range(3)),
            "attention_mask": tuple((b[i], p[i] + s[i]) for i in range(3)),
        }
        for i in range(layers):
            for kind in ("key", "value"):
                shapes[f"past_key_values.{i}.{kind}"] = tuple(
                    (b[j], heads, p[j], head_dim) for j in range(3)
                )
        return shapes

    prefill = profile((1, 1, 1), (1, min(128, max_context), max_context), (0, 0, 0))
    decode_opt_b = min(16, max_batch)
    decode = profile(
        (1, decode_opt_b, max_batch), (1, 1, 1), (1, min(256, max_context - 1), max_context - 1)
    )
    return [prefill, decode]


def build_engine(
    onnx_path: Path, out: Path, profiles: list[dict[str, Any]], *, workspace_gb: float = 4.0
) -> dict[str, Any]:
    """Parse `onnx_path` into a strongly typed network, build it with `profiles`, write `out`.

    The tensor types (fp32, fp16, int8 through Q/DQ) are the ONNX graph's own."""
    require_runtime()
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # required for strong typing on 10.x; accepted and ignored on 11.x, where it is the only mode
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for shapes in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    start = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineBuildError("TensorRT failed to build the engine (see its log above)")
    out.write_bytes(bytes(blob))
    io_types = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io_types[t.name] = str(t.dtype).rsplit(".", 1)[-1]
    return {
        "gpu": str(torch.cuda.get_device_name()),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "tensorrt": str(trt.__version__),
        "strongly_typed": True,
        "input_types": io_types,
        "profiles": [
            {k: [list(s) for s in v] for k, v in p.items() if "past" not in k} for p in profiles
        ],
        "build_seconds": round(time.perf_counter() - start, 1),
        "bytes": out.stat().st_size,
    }


def _hf_dir(version_dir: Path, manifest: Any) -> Path:
    hf = manifest.artifact("torch")
    folder = version_dir / (hf.path if hf is not None else "hf")
    if not (folder / "config.json").exists():
        raise EngineBuildError(f"{version_dir} has no checkpoint (hf/) to export from")
    return folder


def calibration_texts(version_dir: Path, limit: int, path: Path | None = None) -> list[str]:
    """Training texts to calibrate on: a .txt file (one a line), else the version's split."""
    if path is not None and path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return [ln for ln in lines if ln][:limit]
    from headrace.build.data import SPLIT_NAME, Split, read_labelled, stratified_split

    if path is None and (version_dir / SPLIT_NAME).exists():
        return [e.text for e in Split.load(version_dir / SPLIT_NAME).train[:limit]]
    examples, _ = read_labelled(path)
    return [e.text for e in stratified_split(examples, seed=0).train[:limit]]


def engine_onnx(
    version_dir: Path,
    precision: str,
    tmp: Path,
    *,
    calib_data: Path | None = None,
    calib_texts: int = 512,
) -> Path:
    """The ONNX graph whose types make an engine of `precision` (CPU only: runs anywhere)."""
    from headrace.build.export import export_decoder, export_encoder
    from headrace.server.manifest import read_manifest
    from headrace.server.types import Task

    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision must be fp32, fp16 or int8, not {precision!r}")
    version_dir, tmp = Path(version_dir), Path(tmp)
    manifest = read_manifest(version_dir)
    if manifest.task is Task.GENERATE:
        if precision == "int8":
            raise EngineBuildError("int8 engines are built for classifiers only (use fp16)")
        if precision == "fp16":
            path = tmp / "decoder.fp16.onnx"
            export_decoder(_hf_dir(version_dir, manifest), path, dtype="fp16")
            return path
        art = next(
            (a for a in manifest.artifacts if a.backend == "onnxruntime" and a.precision == "fp32"),
            None,
        )
        if art is None:
            raise EngineBuildError(f"{version_dir} has no fp32 ONNX decoder: run export first")
        return version_dir / art.path
    if precision == "int8":
        qdq = next(
            (
                a
                for a in manifest.artifacts
                if a.backend == "onnxruntime" and a.extra.get("quantization") == "static-qdq"
            ),
            None,
        )
        if qdq is not None:
            return version_dir / qdq.path
    plain = tmp / f"encoder.{'fp16' if precision == 'fp16' else 'fp32'}.onnx"
    hf = _hf_dir(version_dir, manifest)
    export_encoder(hf, plain, optimize=False, dtype="fp16" if precision == "fp16" else "fp32")
    if precision != "int8":
        return plain
    from headrace.build.quantize import quantize_static_qdq

    texts = calibration_texts(version_dir, calib_texts, calib_data)
    if len(texts) < 8:
        raise EngineBuildError("int8: fewer than 8 calibration texts")
    out = tmp / "encoder.qdq.onnx"
    quantize_static_qdq(
        plain, out, hf / "tokenizer.json", texts, max_len=manifest.limits.max_input_tokens
    )
    return out


def build_version_engine(
    version_dir: Path,
    *,
    precision: str = "fp16",
    max_batch: int = 64,
    calib_data: Path | None = None,
    calib_texts: int = 512,
    workspace_gb: float = 4.0,
) -> dict[str, Any]:
    """Build NAME/VERSION/model.plan from the version's ONNX (or HF) form; update the manifest."""
    import onnx
    from headrace.server.manifest import Artifact, read_manifest
    from headrace.server.types import Task

    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision must be fp32, fp16 or int8, not {precision!r}")
    require_runtime()
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    out = version_dir / ENGINE_NAME
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = engine_onnx(
            version_dir, precision, Path(tmp), calib_data=calib_data, calib_texts=calib_texts
        )
        if manifest.task is Task.CLASSIFY:
            max_seq = manifest.limits.max_input_tokens
            profiles = encoder_profiles(max_batch, max_seq, opt_seq=min(64, max_seq))
            facts = build_engine(onnx_path, out, profiles, workspace_gb=workspace_gb)
        else:
            model = onnx.load(str(onnx_path), load_external_data=False)
            meta = {p.key: p.value for p in model.metadata_props}
            layers, heads = int(meta["num_layers"]), int(meta["num_heads"])
            max_context = min(int(meta["max_context"]), manifest.generation.max_context)
            profiles = decoder_profiles(
                max_batch, max_context, layers, heads, int(meta["head_dim"])
            )
            facts = build_engine(onnx_path, out, profiles, workspace_gb=workspace_gb)
            facts["max_context"] = max_context
    facts["precision"] = precision
    facts["kv_dtype"] = "fp16" if precision == "fp16" and manifest.task is Task.GENERATE else "fp32"
    kept = tuple(a for a in manifest.artifacts if a.backend != "tensorrt")
    artifact = Artifact("tensorrt", ENGINE_NAME, precision, facts)
    dataclasses.replace(manifest, artifacts=(artifact, *kept)).write(version_dir)
    return facts


def cmd_engine(args: argparse.Namespace) -> int:
    try:
        facts = build_version_engine(
            args.version,
            precision=args.precision,
            max_batch=args.max_batch,
            calib_data=args.calib_data,
            calib_texts=args.calib_texts,
            workspace_gb=args.workspace_gb,
        )
    except EngineBuildError as exc:
        print(f"headrace build engine: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.version / ENGINE_NAME}: {facts['precision']} on {facts['gpu']}, "
        f"TensorRT {facts['tensorrt']}, {facts['bytes']} bytes, {facts['build_seconds']} s"
    )
    return 0


def register(subparsers: Any) -> None:
    """Add `engine` to the `build` command's subparsers."""
    p = subparsers.add_parser(
        "engine",
        help="build a TensorRT engine for a model version (needs tensorrt and an NVIDIA GPU)",
        description="ONNX -> serialized TensorRT engine (model.plan) for THIS GPU model: a "
        "strongly typed network (TensorRT 10.x or 11.x) whose precision is the ONNX graph's "
        "(fp16 export, or the calibrated int8 Q/DQ graph), with optimisation profiles over "
        "batch and sequence (and past) length; listed first in the version's manifest with "
        "the GPU, TensorRT version, profiles and precision.",
    )
    p.add_argument("version", type=Path, help="model version folder (NAME/VERSION)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch (default 64)")
    p.add_argument(
        "--calib-data",
        type=Path,
        default=None,
        help="int8 without a calibrated model.qdq.onnx: .txt (one text a line) or "
        "CSV/JSONL of training texts (default: the version's split.json)",
    )
    p.add_argument("--calib-texts", type=int, default=512, help="int8: texts to calibrate on")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace (GiB)")
    p.set_defaults(func=cmd_engine)

"""`headrace build engine`: ONNX -> serialized TensorRT engine, listed in the manifest.

    headrace build engine models/sentiment/1 --precision fp16
    headrace build engine models/sentiment/1 --precision int8          # calibrated on train texts
    headrace build engine models/tweetgpt/1 --max-batch 64

Encoder: a plain ONNX export of the version's HF checkpoint (ONNX Runtime's fused
contrib operators are not TensorRT operators), one optimisation profile per batch
bucket (1-8, 9-32, 33-max) over sequence lengths 1..max_input_tokens.
Decoder: the KV-cache graph of build/export.py (model.onnx, fp32), two profiles:
prefill (batch 1, past 0, prompt 1..max_context) and decode (batch 1..max, one token,
past 1..max_context-1); in fp16 builds the past/present tensors are fp16 at the engine's
boundary too, halving the KV cache.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENGINE_NAME = "model.plan"
ENCODER_BATCH_BUCKETS = (8, 32)  # profile upper bounds below max_batch


class EngineBuildError(RuntimeError):
    """The engine could not be built (the message says why, in one line)."""


def _require_runtime() -> tuple[Any, Any]:
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
        raise EngineBuildError("no NVIDIA GPU with CUDA is visible here: engines are built on "
                               "the GPU model that will serve them")  # fmt: skip
    return trt, torch


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


def make_calibrator(trt: Any, batches: list[dict[str, Any]], cache: Path) -> Any:
    """An INT8 entropy calibrator over `batches` (name -> CUDA tensor [B, S]), cached."""

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.i = 0

        def get_batch_size(self) -> int:
            return int(next(iter(batches[0].values())).shape[0])

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            if self.i >= len(batches):
                return None
            batch = batches[self.i]
            self.i += 1
            return [int(batch[n].data_ptr()) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.write_bytes(bytes(data))

    return Calibrator()


def _calibration_batches(
    torch: Any, version_dir: Path, texts: Sequence[str], batch: int, seq: int
) -> list[dict[str, Any]]:
    from headrace.server.manifest import read_manifest
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(version_dir / read_manifest(version_dir).tokenizer))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq)
    out = []
    for lo in range(0, len(texts) - batch + 1, batch):
        enc = tok.encode_batch(list(texts[lo : lo + batch]))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64, device="cuda")
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64, device="cuda")
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def training_texts(path: Path | None, limit: int) -> list[str]:
    """Calibration texts: one per line of `path`, or the train split of the default corpus."""
    if path is not None and path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return [ln for ln in lines if ln][:limit]
    from headrace.build.data import read_labelled, stratified_split

    examples, _ = read_labelled(path)
    return [e.text for e in stratified_split(examples, seed=0).train[:limit]]


def shapes_of_inputs(network: Any) -> list[str]:
    return [network.get_input(i).name for i in range(network.num_inputs)]


def build_engine(
    onnx_path: Path,
    out: Path,
    profiles: list[dict[str, Any]],
    *,
    precision: str = "fp16",
    kv_half: bool = False,
    calibrator: Any = None,
    calib_seq: int = 0,
    workspace_gb: float = 4.0,
) -> dict[str, Any]:
    """Parse `onnx_path`, build with `profiles` at `precision`, write `out`; return facts."""
    trt, torch = _require_runtime()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
    if kv_half:  # past/present at the boundary in fp16: half the KV-cache memory
        for t in [network.get_input(i) for i in range(network.num_inputs)] + [
            network.get_output(i) for i in range(network.num_outputs)
        ]:
            if t.name.startswith(("past_key_values.", "present.")):
                t.dtype = trt.float16
    for shapes in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    if precision == "int8" and calibrator is not None:
        # calibration runs at the calibration batches' own fixed shape
        calib = builder.create_optimization_profile()
        shape = (calibrator.get_batch_size(), calib_seq)
        for name in shapes_of_inputs(network):
            calib.set_shape(name, shape, shape, shape)
        config.set_calibration_profile(calib)
    start = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineBuildError("TensorRT failed to build the engine (see its log above)")
    out.write_bytes(bytes(blob))
    return {
        "gpu": str(torch.cuda.get_device_name()),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "tensorrt": str(trt.__version__),
        "precision": precision,
        "kv_dtype": "fp16" if kv_half else "fp32",
        "profiles": [
            {k: [list(s) for s in v] for k, v in p.items() if "past" not in k} for p in profiles
        ],
        "build_seconds": round(time.perf_counter() - start, 1),
        "bytes": out.stat().st_size,
    }


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
    from headrace.server.manifest import Artifact, read_manifest
    from headrace.server.types import Task

    if precision not in ("fp32", "fp16", "int8"):
        raise EngineBuildError(f"precision must be fp32, fp16 or int8, not {precision!r}")
    trt, torch = _require_runtime()
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    out = version_dir / ENGINE_NAME
    with tempfile.TemporaryDirectory() as tmp:
        if manifest.task is Task.CLASSIFY:
            from headrace.build.export import export_encoder

            hf = manifest.artifact("torch")
            if hf is None:
                raise EngineBuildError(f"{version_dir} has no torch (HF) artifact to export")
            onnx_path = Path(tmp) / "encoder.onnx"
            export_encoder(version_dir / hf.path, onnx_path, optimize=False)
            max_seq = manifest.limits.max_input_tokens
            profiles = encoder_profiles(max_batch, max_seq, opt_seq=min(64, max_seq))
            calibrator = None
            if precision == "int8":
                texts = training_texts(calib_data, calib_texts)
                batches = _calibration_batches(torch, version_dir, texts, 32, max_seq)
                cache = version_dir / "model.plan.calib"
                if not batches:
                    raise EngineBuildError("int8: fewer than 32 calibration texts")
                calibrator = make_calibrator(trt, batches, cache)
            facts = build_engine(onnx_path, out, profiles, precision=precision,
                                 calibrator=calibrator, calib_seq=max_seq,
                                 workspace_gb=workspace_gb)  # fmt: skip
        else:
            if precision == "int8":
                raise EngineBuildError("int8 engines are built for classifiers only (use fp16)")
            onnx_art = next((a for a in manifest.artifacts
                             if a.backend == "onnxruntime" and a.precision == "fp32"), None)  # fmt: skip
            if onnx_art is None:
                raise EngineBuildError(
                    f"{version_dir} has no fp32 ONNX decoder: run the export step first"
                )
            import onnx

            model = onnx.load(str(version_dir / onnx_art.path), load_external_data=False)
            meta = {p.key: p.value for p in model.metadata_props}
            layers, heads = int(meta["num_layers"]), int(meta["num_heads"])
            head_dim = int(meta["head_dim"])
            max_context = min(int(meta["max_context"]), manifest.generation.max_context)
            profiles = decoder_profiles(max_batch, max_context, layers, heads, head_dim)
            facts = build_engine(version_dir / onnx_art.path, out, profiles, precision=precision,
                                 kv_half=precision == "fp16", workspace_gb=workspace_gb)  # fmt: skip
            facts["max_context"] = max_context
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
    print(f"wrote {args.version / ENGINE_NAME}: {facts['precision']} on {facts['gpu']}, "
          f"TensorRT {facts['tensorrt']}, {facts['bytes']} bytes, {facts['build_seconds']} s")  # fmt: skip
    return 0


def register(subparsers: Any) -> None:
    """Add `engine` to the `build` command's subparsers."""
    p = subparsers.add_parser(
        "engine",
        help="build a TensorRT engine for a model version (needs tensorrt and an NVIDIA GPU)",
        description="ONNX -> serialized TensorRT engine (model.plan) for THIS GPU model, with "
        "optimisation profiles over batch and sequence (and past) length; listed first in the "
        "version's manifest with the GPU, TensorRT version, profiles and precision.",
    )
    p.add_argument("version", type=Path, help="model version folder (NAME/VERSION)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch (default 64)")
    p.add_argument("--calib-data", type=Path, default=None,
                   help="int8: .txt (one text a line) or CSV/JSONL of training texts "
                   "(default: the train split of the default corpus)")  # fmt: skip
    p.add_argument("--calib-texts", type=int, default=512, help="int8: texts to calibrate on")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace (GiB)")
    p.set_defaults(func=cmd_engine)

"""The server's own backends, declared for the registry (pyproject.toml's entry points).

This module imports neither torch nor tensorrt: each loader imports its backend module
(and so its runtime) when a model asks for it. ONNX Runtime declares itself in
edge/ort_backend.py.
"""

from __future__ import annotations

import importlib.util

from headrace.server.backends.base import (
    BackendDeclaration,
    BackendSpec,
    DecoderBackend,
    EncoderBackend,
)
from headrace.server.manifest import Artifact


def _torch_encoder(spec: BackendSpec) -> EncoderBackend:
    from headrace.server.backends.torch_backend import TorchEncoder

    return TorchEncoder(spec)


def _torch_decoder(spec: BackendSpec) -> DecoderBackend:
    from headrace.server.backends.torch_backend import TorchDecoder

    return TorchDecoder(spec)


def _trt_encoder(spec: BackendSpec) -> EncoderBackend:
    from headrace.server.backends.tensorrt_backend import TrtEncoder

    return TrtEncoder(spec)


def _trt_decoder(spec: BackendSpec) -> DecoderBackend:
    from headrace.server.backends.tensorrt_backend import TrtDecoder

    return TrtDecoder(spec)


def tensorrt_available() -> bool:
    """True when the real TensorRT runtime imports (a stubs-only `tensorrt` folder does not count)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Runtime")


def gpu_name(device: str) -> str:
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    return str(torch.cuda.get_device_name(index))


def _engine_runs_here(artifact: Artifact, device: str) -> bool:
    if not tensorrt_available():
        return False
    built_for = artifact.extra.get("gpu")
    # an engine runs only on the GPU model it was built for
    return built_for is None or built_for == gpu_name(device)


# the CPU profile prefers ONNX Runtime (rank 0); torch is the reference everywhere
TORCH = BackendDeclaration(
    name="torch",
    profiles={"datacenter": 1, "cpu": 1},
    encoder=_torch_encoder,
    decoder=_torch_decoder,
)

TENSORRT = BackendDeclaration(
    name="tensorrt",
    profiles={"datacenter": 0},
    encoder=_trt_encoder,
    decoder=_trt_decoder,
    usable=_engine_runs_here,
)

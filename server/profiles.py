"""Which artifact of a manifest this server serves: profiles, backend order, hardware probes.

    edge        onnxruntime only
    datacenter  tensorrt (when the engine was built for this GPU, or says nothing), else
                torch on CUDA; refuses to start without CUDA
    cpu         onnxruntime when present, else torch on CPU
    auto        datacenter when torch sees CUDA, else cpu

The order within a profile is not written here: each backend ranks itself in the
profiles that may serve it (`BackendDeclaration.profiles`), and `backend` (`--backend`)
narrows that order to one backend the profile allows. The lifecycle of what is chosen
(load, lease, retire) is server/repository.py's.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from headrace.server.backends.registry import declaration, profile_order
from headrace.server.manifest import Artifact, Manifest

PROFILES = ("edge", "datacenter", "cpu")  # and "auto", which resolves to one of these


class ProfileError(RuntimeError):
    """The profile cannot run here (e.g. datacenter without CUDA)."""


class NoArtifact(ValueError):
    """The version has no artifact that the profile can serve."""


@dataclass(frozen=True)
class Choice:
    backend: str
    artifact: Artifact
    device: str


def cuda_available() -> bool:
    """True when torch is importable and sees a CUDA device (torch imported only here)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_profile(profile: str) -> str:
    if profile == "auto":
        return "datacenter" if cuda_available() else "cpu"
    if profile == "datacenter" and not cuda_available():
        raise ProfileError(
            "profile 'datacenter' needs an NVIDIA GPU with CUDA and torch built for it; "
            "use --profile cpu or --profile edge on this machine"
        )
    return profile


def choose_artifact(
    manifest: Manifest, profile: str, device: str | None, backend: str | None = None
) -> Choice:
    """Pick the artifact `profile` serves (profile already resolved, never "auto").

    `backend` narrows the profile's order to that one backend (`--backend torch` serves
    the torch reference on a cpu box whose manifests also list ONNX files)."""
    if profile not in PROFILES:
        raise ProfileError(f"unknown profile {profile!r}")
    order = profile_order(profile)
    if not order:
        raise ProfileError(f"no installed backend serves the {profile} profile")
    if backend is not None:
        if backend not in order:
            raise ProfileError(
                f"profile {profile!r} serves {' or '.join(order)}, not backend {backend!r}"
            )
        order = (backend,)
    dev = device or ("cuda:0" if profile == "datacenter" else "cpu")
    for name in order:
        art = manifest.artifact(name)
        if art is not None and declaration(name).usable(art, dev):
            return Choice(name, art, dev)
    raise NoArtifact(
        f"the {profile} profile serves {' or '.join(order)} artifacts and this version has "
        "none it can use here"
    )

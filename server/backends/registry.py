"""Backends by name, read from their declarations.

Each backend declares itself once (`BackendDeclaration`, server/backends/base.py) and
an entry point of the `headrace.backends` group names that declaration; pyproject.toml
lists ours:

    [project.entry-points."headrace.backends"]
    torch = "headrace.server.backends.builtin:TORCH"
    onnxruntime = "headrace.edge.ort_backend:ONNXRUNTIME"

So the server never names a package that depends on it (edge depends on server, not
the other way round), and a backend in another distribution plugs in the same way.
Loading a declaration imports no runtime; a loader imports it when a model asks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TypeVar

from headrace.server.backends.base import (
    BackendDeclaration,
    BackendSpec,
    BackendUnavailable,
    DecoderBackend,
    EncoderBackend,
)
from headrace.server.logs import get_logger
from headrace.server.types import Task

ENTRY_POINT_GROUP = "headrace.backends"
B = TypeVar("B", EncoderBackend, DecoderBackend)

log = get_logger("headrace.backends")


@functools.cache
def declarations() -> dict[str, BackendDeclaration]:
    """Every installed backend's declaration, by name (read once per process)."""
    found: dict[str, BackendDeclaration] = {}
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if entry.name in found:
            continue  # the same distribution seen twice on sys.path
        try:
            declared = entry.load()
        except ImportError as exc:
            log.warning("backend_declaration_skipped", backend=entry.name, reason=str(exc))
            continue
        if not isinstance(declared, BackendDeclaration) or declared.name != entry.name:
            raise TypeError(f"entry point {entry.value} is not the declaration of {entry.name!r}")
        found[entry.name] = declared
    return found


def backend_names() -> tuple[str, ...]:
    return tuple(sorted(declarations()))


def profile_order(profile: str) -> tuple[str, ...]:
    """The backends `profile` may serve, in the order it prefers them (empty: unknown)."""
    ranked = sorted(
        (d.profiles[profile], d.name) for d in declarations().values() if profile in d.profiles
    )
    return tuple(name for _, name in ranked)


def declaration(name: str) -> BackendDeclaration:
    try:
        return declarations()[name]
    except KeyError:
        raise BackendUnavailable(f"no backend {name!r} is installed") from None


def _load(loader: Callable[[BackendSpec], B] | None, spec: BackendSpec, task: Task) -> B:
    if loader is None or spec.task is not task:
        raise BackendUnavailable(f"no backend {spec.backend!r} for task {spec.task.value}")
    try:
        return loader(spec)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {spec.backend!r} is not installed: {exc}") from exc


def load_encoder(spec: BackendSpec) -> EncoderBackend:
    return _load(declaration(spec.backend).encoder, spec, Task.CLASSIFY)


def load_decoder(spec: BackendSpec) -> DecoderBackend:
    return _load(declaration(spec.backend).decoder, spec, Task.GENERATE)


def load_backend(spec: BackendSpec) -> EncoderBackend | DecoderBackend:
    """The backend for `spec.task`: an EncoderBackend to classify, a DecoderBackend to generate."""
    return load_encoder(spec) if spec.task is Task.CLASSIFY else load_decoder(spec)

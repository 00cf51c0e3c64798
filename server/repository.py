"""The model repository: a folder of `NAME/VERSION/headrace.json`, served and hot-reloaded.

VERSION is an integer folder name; the highest ready version is the newest.
For each version the server's profile picks one artifact of the manifest:

    edge        onnxruntime only
    datacenter  tensorrt (when the engine was built for this GPU, or says nothing), else
                torch on CUDA; refuses to start without CUDA
    cpu         onnxruntime when present, else torch on CPU
    auto        datacenter when torch sees CUDA, else cpu

`backend` (`--backend`) narrows that order to one backend the profile allows.

A background task rescans every `poll_interval_s`: a new version is loaded
and started before it becomes the newest served; a removed version leaves the
served set at once and is stopped once its in-flight calls are done. A
version that fails to load is logged in one line and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headrace.server.backends.registry import BackendSpec, load_backend
from headrace.server.errors import ModelNotFound
from headrace.server.logs import get_logger
from headrace.server.manifest import MANIFEST_NAME, Artifact, Limits, Manifest, read_manifest
from headrace.server.types import Task

log = get_logger("headrace.repository")

Listener = Callable[[], Awaitable[None]]


class ProfileError(RuntimeError):
    """The profile cannot run here (e.g. datacenter without CUDA)."""


class NoArtifact(ValueError):
    """The version has no artifact that the profile can serve."""


@dataclass(frozen=True)
class Choice:
    backend: str
    artifact: Artifact
    device: str


@dataclass
class LoadedVersion:
    """One started model version and the calls it is serving."""

    name: str
    version: str
    path: Path
    manifest: Manifest
    choice: Choice
    model: Any  # ClassifierModel | GeneratorModel
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def number(self) -> int:
        return int(self.version)


@dataclass(frozen=True)
class ModelEntry:
    """What ListModels and `headrace models` show for one model name."""

    name: str
    versions: tuple[str, ...]  # newest first
    task: Task
    labels: tuple[str, ...]
    backend: str
    precision: str
    device: str
    limits: Limits
    max_batch: int
    is_default: bool


def cuda_available() -> bool:
    """True when torch is importable and sees a CUDA device (torch imported only here)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def tensorrt_available() -> bool:
    """True when the real TensorRT runtime imports (a stubs-only `tensorrt` folder does not count)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Runtime")


def gpu_name(device: str) -> str | None:
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    return str(torch.cuda.get_device_name(index))


def resolve_profile(profile: str) -> str:
    if profile == "auto":
        return "datacenter" if cuda_available() else "cpu"
    if profile == "datacenter" and not cuda_available():
        raise ProfileError(
            "profile 'datacenter' needs an NVIDIA GPU with CUDA and torch built for it; "
            "use --profile cpu or --profile edge on this machine"
        )
    return profile


# the backends each profile may serve, in the order it prefers them
PROFILE_BACKENDS = {
    "edge": ("onnxruntime",),
    "datacenter": ("tensorrt", "torch"),
    "cpu": ("onnxruntime", "torch"),
}


def choose_artifact(
    manifest: Manifest, profile: str, device: str | None, backend: str | None = None
) -> Choice:
    """Pick the artifact `profile` serves (profile already resolved, never "auto").

    `backend` narrows the profile's order to that one backend (`--backend torch` serves
    the torch reference on a cpu box whose manifests also list ONNX files)."""
    try:
        order = PROFILE_BACKENDS[profile]
    except KeyError:
        raise ProfileError(f"unknown profile {profile!r}") from None
    if backend is not None:
        if backend not in order:
            raise ProfileError(
                f"profile {profile!r} serves {' or '.join(order)}, not backend {backend!r}"
            )
        order = (backend,)
    dev = device or ("cuda:0" if profile == "datacenter" else "cpu")
    for name in order:
        art = manifest.artifact(name)
        if art is None:
            continue
        if name == "tensorrt":
            if not tensorrt_available():
                continue
            built_for = art.extra.get("gpu")
            if built_for is not None and built_for != gpu_name(dev):
                continue  # an engine runs only on the GPU model it was built for
        return Choice(name, art, dev)
    raise NoArtifact(
        f"the {profile} profile serves {' or '.join(order)} artifacts and this version has "
        "none it can use here"
    )


def scan(root: Path) -> dict[tuple[str, str], Path]:
    """(name, version) -> version folder, for every folder holding a manifest."""
    found: dict[tuple[str, str], Path] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue
        for version_dir in model_dir.iterdir():
            if version_dir.is_dir() and version_dir.name.isdigit():
                if (version_dir / MANIFEST_NAME).is_file():
                    found[(model_dir.name, str(int(version_dir.name)))] = version_dir
    return found


def _mtime(version_dir: Path) -> float:
    try:
        return float((version_dir / MANIFEST_NAME).stat().st_mtime)
    except OSError:
        return 0.0


class ModelRepository:
    def __init__(
        self,
        root: Path,
        *,
        profile: str = "auto",
        device: str | None = None,
        backend: str | None = None,
        poll_interval_s: float = 2.0,
        backend_options: dict[str, Any] | None = None,
        defaults: dict[Task, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.requested_profile = profile
        self.profile = profile  # resolved in start()
        self.device = device
        self.backend = backend  # None: the profile's order (PROFILE_BACKENDS)
        self.poll_interval_s = poll_interval_s
        self.backend_options = dict(backend_options or {})
        self.defaults = dict(defaults or {})
        self._served: dict[str, dict[str, LoadedVersion]] = {}
        self._failed: dict[tuple[str, str], float] = {}  # (name, version) -> manifest mtime
        self._listeners: list[Listener] = []
        self._poller: asyncio.Task[None] | None = None
        self._retiring: dict[asyncio.Task[None], LoadedVersion] = {}
        self._lock = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """`listener()` is awaited after every change of the served set."""
        self._listeners.append(listener)

    async def start(self) -> None:
        self.profile = resolve_profile(self.requested_profile)
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a folder")
        await self.refresh()
        if self.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll(), name="model-repository-poll")

    async def stop(self, *, drain: bool = True) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        async with self._lock:
            versions = [v for vs in self._served.values() for v in vs.values()]
            self._served.clear()
        # Removed versions still waiting for their calls: stop them now with the rest.
        for task, version in list(self._retiring.items()):
            if version.inflight:
                task.cancel()
                versions.append(version)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await asyncio.gather(*(v.model.stop(drain=drain) for v in versions), return_exceptions=True)
        for v in versions:
            await asyncio.to_thread(_close_backend, v.model)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("repository_scan_failed", root=str(self.root))

    async def refresh(self) -> bool:
        """Load new versions, retire removed ones. True when the served set changed."""
        async with self._lock:
            found = await asyncio.to_thread(scan, self.root)
            loaded = {(n, v) for n, vs in self._served.items() for v in vs}
            changed = False
            for key in sorted(set(found) - loaded, key=lambda k: (k[0], int(k[1]))):
                mtime = _mtime(found[key])
                if self._failed.get(key) == mtime:
                    continue  # failed before and unchanged since
                version = await self._load(key[0], key[1], found[key])
                if version is None:
                    self._failed[key] = mtime
                    continue
                self._failed.pop(key, None)
                self._served.setdefault(key[0], {})[key[1]] = version
                changed = True
            for name, ver in loaded - set(found):
                retired = self._served[name].pop(ver)
                if not self._served[name]:
                    del self._served[name]
                log.info("model_version_removed", model=name, model_version=ver)
                task = asyncio.create_task(self._retire(retired))
                self._retiring[task] = retired
                task.add_done_callback(self._forget_retired)
                changed = True
            for key in set(self._failed) - set(found):
                del self._failed[key]
        if changed:
            for listener in self._listeners:
                await listener()
        return changed

    async def _load(self, name: str, version: str, path: Path) -> LoadedVersion | None:
        try:
            manifest = await asyncio.to_thread(read_manifest, path)
            choice = choose_artifact(manifest, self.profile, self.device, self.backend)
            model = await asyncio.to_thread(
                self._build_model, name, version, path, manifest, choice
            )
            try:
                await model.start()
            except BaseException:
                await asyncio.to_thread(_close_backend, model)
                raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = str(exc).replace(str(path), f"{name}/{version}") or type(exc).__name__
            log.warning(
                "model_version_skipped",
                model=name,
                model_version=version,
                reason=f"{type(exc).__name__}: {reason}",
            )
            return None
        log.info(
            "model_version_ready",
            model=name,
            model_version=version,
            task=manifest.task.value,
            backend=choice.backend,
            precision=choice.artifact.precision,
            device=choice.device,
        )
        return LoadedVersion(name, version, path, manifest, choice, model)

    def _build_model(
        self, name: str, version: str, path: Path, manifest: Manifest, choice: Choice
    ) -> Any:
        from headrace.server.models import ClassifierModel, GeneratorModel, load_tokenizer

        spec = BackendSpec(
            task=manifest.task,
            backend=choice.backend,
            path=(path / choice.artifact.path).resolve(),
            precision=choice.artifact.precision,
            device=choice.device,
            manifest=manifest,
            version_dir=path.resolve(),
            max_slots=manifest.batching.max_batch,
            options=dict(self.backend_options),
        )
        tokenizer = load_tokenizer(path / manifest.tokenizer)
        backend = load_backend(spec)
        cls = ClassifierModel if manifest.task is Task.CLASSIFY else GeneratorModel
        return cls(name, version, manifest, backend, tokenizer)

    def _forget_retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)

    async def _retire(self, version: LoadedVersion) -> None:
        if version.inflight:
            await version.idle.wait()
        try:
            await version.model.stop(drain=True)
            await asyncio.to_thread(_close_backend, version.model)
        except Exception:
            log.exception(
                "model_version_stop_failed", model=version.name, model_version=version.version
            )

    # -- lookup ----------------------------------------------------------------------------

    def default_name(self, task: Task) -> str | None:
        if task in self.defaults:
            return self.defaults[task]
        names = sorted(n for n, vs in self._served.items() if _task_of(vs) is task)
        return names[0] if names else None

    def _find(self, name: str | None, version: str | None, task: Task) -> LoadedVersion:
        if not name:
            name = self.default_name(task)
            if name is None:
                raise ModelNotFound(f"no {task.value} model is loaded")
        versions = self._served.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} is not served")
        if _task_of(versions) is not task:
            raise ModelNotFound(f"model {name!r} does not serve {task.value} requests")
        if not version:
            return versions[max(versions, key=int)]
        key = str(int(version)) if version.isdigit() else version
        if key not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r}")
        return versions[key]

    def get(self, name: str | None, version: str | None, task: Task) -> Any:
        """The started model for (name, version); empty name = default, empty version = newest."""
        return self._find(name, version, task).model

    @contextlib.asynccontextmanager
    async def lease(
        self, name: str | None, version: str | None, task: Task
    ) -> AsyncIterator[LoadedVersion]:
        """Like `get`, and keeps the version from being stopped until the block exits."""
        loaded = self._find(name, version, task)
        loaded.inflight += 1
        loaded.idle.clear()
        try:
            yield loaded
        finally:
            loaded.inflight -= 1
            if loaded.inflight == 0:
                loaded.idle.set()

    def names(self) -> list[str]:
        return sorted(self._served)

    def versions(self, name: str) -> list[LoadedVersion]:
        """Served versions of `name`, newest first."""
        return sorted(self._served.get(name, {}).values(), key=lambda v: -v.number)

    def list_models(self, task: Task | None = None) -> list[ModelEntry]:
        entries = []
        for name in self.names():
            versions = self.versions(name)
            newest = versions[0]
            if task is not None and newest.manifest.task is not task:
                continue
            entries.append(
                ModelEntry(
                    name=name,
                    versions=tuple(v.version for v in versions),
                    task=newest.manifest.task,
                    labels=newest.manifest.labels,
                    backend=newest.choice.backend,
                    precision=newest.choice.artifact.precision,
                    device=newest.choice.device,
                    limits=newest.manifest.limits,
                    max_batch=newest.manifest.batching.max_batch,
                    is_default=self.default_name(newest.manifest.task) == name,
                )
            )
        return entries


def _task_of(versions: dict[str, LoadedVersion]) -> Task:
    return versions[max(versions, key=int)].manifest.task


def _close_backend(model: Any) -> None:
    backend = getattr(model, "backend", None)
    close = getattr(backend, "close", None)
    if close is not None:
        close()

"""The model repository: a folder of `NAME/VERSION/headrace.json`, served and hot-reloaded.

VERSION is an integer folder name; the highest ready version is the newest. For
each version the server's profile picks one artifact of the manifest
(server/profiles.py); this module owns what happens to it next: load, start,
lease to calls, retire.

A background task rescans every `poll_interval_s`: a new version is loaded
and started before it becomes the newest served; a removed version leaves the
served set at once and is stopped once its in-flight calls are done. A
version that fails to load is logged in one line and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from headrace.server.backends.base import BackendSpec
from headrace.server.backends.registry import load_decoder, load_encoder
from headrace.server.errors import ModelNotFound
from headrace.server.logs import get_logger
from headrace.server.manifest import MANIFEST_NAME, Limits, Manifest, read_manifest
from headrace.server.models import ClassifierModel, GeneratorModel, ServedModel, load_tokenizer
from headrace.server.profiles import Choice, choose_artifact, resolve_profile
from headrace.server.types import StreamInterval, Task

log = get_logger("headrace.repository")

Listener = Callable[[], Awaitable[None]]


M = TypeVar("M", bound=ServedModel)


@dataclass
class LoadedVersion:
    """One started model version and the calls it is serving."""

    name: str
    version: str
    path: Path
    manifest: Manifest
    choice: Choice
    model: ServedModel
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def number(self) -> int:
        return int(self.version)


@dataclass(frozen=True)
class Lease(Generic[M]):
    """A served version held for one call (see ModelRepository.lease)."""

    name: str
    version: str
    manifest: Manifest
    model: M


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
        backend_options: Mapping[str, object] | None = None,
        defaults: dict[Task, str] | None = None,
        stream: StreamInterval | None = None,
    ) -> None:
        self.root = Path(root)
        self.requested_profile = profile
        self.profile = profile  # resolved in start()
        self.device = device
        self.backend = backend  # None: the profile's whole order (server/profiles.py)
        self.poll_interval_s = poll_interval_s
        self.backend_options = dict(backend_options or {})
        self.defaults = dict(defaults or {})
        self.stream = stream or StreamInterval()  # a stream's default message rule
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
            await asyncio.to_thread(v.model.close)

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
                await asyncio.to_thread(model.close)
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
    ) -> ServedModel:
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
        if manifest.task is Task.CLASSIFY:
            return ClassifierModel(name, version, manifest, load_encoder(spec), tokenizer)
        model = GeneratorModel(name, version, manifest, load_decoder(spec), tokenizer)
        model.stream = self.stream
        return model

    def _forget_retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)

    async def _retire(self, version: LoadedVersion) -> None:
        if version.inflight:
            await version.idle.wait()
        try:
            await version.model.stop(drain=True)
            await asyncio.to_thread(version.model.close)
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

    def _find_as(
        self, name: str | None, version: str | None, kind: type[M]
    ) -> tuple[LoadedVersion, M]:
        loaded = self._find(name, version, kind.task)
        if not isinstance(loaded.model, kind):  # the task matched: only a subclass mix-up
            raise ModelNotFound(f"model {loaded.name!r} does not serve {kind.task.value} requests")
        return loaded, loaded.model

    def get(self, name: str | None, version: str | None, kind: type[M]) -> M:
        """The started model for (name, version) of `kind` (ClassifierModel, GeneratorModel);
        empty name = the default of its task, empty version = the newest."""
        return self._find_as(name, version, kind)[1]

    @contextlib.asynccontextmanager
    async def lease(
        self, name: str | None, version: str | None, kind: type[M]
    ) -> AsyncIterator[Lease[M]]:
        """Like `get`, and keeps the version from being stopped until the block exits."""
        loaded, model = self._find_as(name, version, kind)
        loaded.inflight += 1
        loaded.idle.clear()
        try:
            yield Lease(loaded.name, loaded.version, loaded.manifest, model)
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

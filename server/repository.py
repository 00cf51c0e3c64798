"""The model repository: a folder of `NAME/VERSION/headrace.json`, served and hot-reloaded.

VERSION is an integer folder name; the highest ready version is the newest. For
each version the server's profile picks one artifact of the manifest
(server/profiles.py); this module owns what happens to it next: load, start,
lease to calls, retire.

A background task rescans every `poll_interval_s`: a new version is loaded
(server/loader.py) and started before it becomes the newest served; a removed
version leaves the served set at once and is stopped once its in-flight calls
are done. A version that fails to load (or takes longer than `load_timeout_s`)
is logged in one line and skipped; every version's state (loading, ready,
failed with its reason, retiring) is kept in `states` (server/model_state.py)
for ListModels, health and the errors callers get.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from headrace.server.errors import ModelNotFound
from headrace.server.loader import LoadedVersion, LoadFailed, VersionLoader
from headrace.server.logs import get_logger
from headrace.server.manifest import MANIFEST_NAME, Limits, Manifest
from headrace.server.model_state import ModelEntry, ModelState, ModelStates
from headrace.server.models import ServedModel
from headrace.server.profiles import resolve_profile
from headrace.server.types import StreamInterval, Task

if TYPE_CHECKING:
    from headrace.server.config import ServerConfig

__all__ = ["Lease", "LoadedVersion", "ModelEntry", "ModelRepository", "scan"]

log = get_logger("headrace.repository")

Listener = Callable[[], Awaitable[None]]
Serves = Callable[[Path], bool]  # which version folders a repository serves


M = TypeVar("M", bound=ServedModel)


@dataclass(frozen=True)
class Lease(Generic[M]):
    """A served version held for one call (see ModelRepository.lease)."""

    name: str
    version: str
    manifest: Manifest
    model: M


def scan(root: Path, serves: Serves | None = None) -> dict[tuple[str, str], Path]:
    """(name, version) -> version folder, for each folder with a manifest `serves` takes."""
    found: dict[tuple[str, str], Path] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue
        for version_dir in model_dir.iterdir():
            if version_dir.is_dir() and is_version_number(version_dir.name):
                manifest = version_dir / MANIFEST_NAME
                if manifest.is_file() and (serves is None or serves(version_dir)):
                    found[(model_dir.name, version_key(version_dir.name))] = version_dir
    return found


def is_version_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() is true of "²" too, which int() refuses."""
    return text.isascii() and text.isdigit()


def version_key(version: str) -> str:
    """A caller's version as the repository keys it: "007" -> "7"; anything else as given.

    No int(): a caller's 5,000-digit version is past int()'s digit limit."""
    if is_version_number(version):
        return version.lstrip("0") or "0"
    return version


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
        load_timeout_s: float = 300.0,
        stream: StreamInterval | None = None,
        serves: Serves | None = None,
    ) -> None:
        self.root = Path(root)
        self.serves = serves  # None: every version; else only the folders it accepts
        self.requested_profile = profile
        self.profile = profile  # resolved in start()
        self.device = device
        self.backend = backend  # None: the profile's whole order (server/profiles.py)
        self.poll_interval_s = poll_interval_s
        self.backend_options = dict(backend_options or {})
        self.defaults = dict(defaults or {})
        self.load_timeout_s = load_timeout_s  # 0: no limit
        self.states = ModelStates()
        self.stream = stream or StreamInterval()  # a stream's default message rule
        self._served: dict[str, dict[str, LoadedVersion]] = {}
        self._failed: dict[tuple[str, str], float] = {}  # (name, version) -> manifest mtime
        self._listeners: list[Listener] = []
        self._poller: asyncio.Task[None] | None = None
        self._retiring: dict[asyncio.Task[None], LoadedVersion] = {}
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(cls, config: ServerConfig, serves: Serves | None = None) -> ModelRepository:
        """The repository `headrace serve` runs (in the server, or in its engine process)."""
        assert config.models is not None
        return cls(
            config.models,
            profile=config.profile,
            device=config.device,
            backend=config.backend,
            poll_interval_s=config.poll_interval_s,
            backend_options=config.backend_options(),
            defaults=config.defaults(),
            load_timeout_s=config.load_timeout_s,
            stream=config.stream_defaults(),
            serves=serves,
        )

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
        for v in versions:
            self.states.set(v.name, v.version, ModelState.RETIRING)
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
        """Load new versions, retire removed ones. True when the served set changed.

        Listeners are told of every change, of the served set or of a version's state."""
        changes = self.states.changes
        async with self._lock:
            found = await asyncio.to_thread(scan, self.root, self.serves)
            loaded = {(n, v) for n, vs in self._served.items() for v in vs}
            new = sorted(set(found) - loaded, key=lambda k: (k[0], int(k[1])))
            for name, ver in new:
                if self._failed.get((name, ver)) != _mtime(found[(name, ver)]):
                    self.states.set(name, ver, ModelState.LOADING)
            if self.states.changes != changes:  # health: a new model is NOT_SERVING while it loads
                await self._notify()
            changed = False
            for key in new:
                mtime = _mtime(found[key])
                if self._failed.get(key) == mtime:
                    continue  # failed before and unchanged since
                version = await self._load(key[0], key[1], found[key])
                if version is None:
                    self._failed[key] = mtime
                    continue
                self._failed.pop(key, None)
                self._served.setdefault(key[0], {})[key[1]] = version
                self.states.set(key[0], key[1], ModelState.READY, task=version.manifest.task)
                changed = True
            for name, ver in loaded - set(found):
                retired = self._served[name].pop(ver)
                if not self._served[name]:
                    del self._served[name]
                log.info("model_version_removed", model=name, model_version=ver)
                self.states.set(name, ver, ModelState.RETIRING)
                task = asyncio.create_task(self._retire(retired))
                self._retiring[task] = retired
                task.add_done_callback(self._forget_retired)
                changed = True
            for key in set(self._failed) - set(found):
                del self._failed[key]
                self.states.forget(*key)
        if changed or self.states.changes != changes:
            await self._notify()
        return changed

    async def _notify(self) -> None:
        for listener in self._listeners:
            await listener()

    async def _load(self, name: str, version: str, path: Path) -> LoadedVersion | None:
        loader = VersionLoader(
            profile=self.profile,
            device=self.device,
            backend=self.backend,
            options=self.backend_options,
            timeout_s=self.load_timeout_s,
            stream=self.stream,
        )

        def known_task(task: Task) -> None:
            self.states.set(name, version, ModelState.LOADING, task=task)

        try:
            return await loader.load(name, version, path, on_task=known_task)
        except LoadFailed as exc:
            self.states.set(name, version, ModelState.FAILED, reason=exc.reason, task=exc.task)
            return None

    def _forget_retired(self, task: asyncio.Task[None]) -> None:
        retired = self._retiring.pop(task, None)
        if retired is not None and retired.version not in self._served.get(retired.name, {}):
            self.states.forget(retired.name, retired.version)

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
                raise self.states.not_ready_for_task(task) or ModelNotFound(
                    f"no {task.value} model is loaded"
                )
        versions = self._served.get(name)
        if not versions:
            raise self.states.not_ready(name) or ModelNotFound(f"model {name!r} is not served")
        if _task_of(versions) is not task:
            raise ModelNotFound(f"model {name!r} does not serve {task.value} requests")
        if not version:
            return versions[max(versions, key=int)]
        key = version_key(version)
        if key not in versions:
            raise self.states.not_ready(name, key) or ModelNotFound(
                f"model {name!r} has no version {version!r}"
            )
        return versions[key]

    def served_versions(self, name: str, version: str = "") -> list[LoadedVersion]:
        """Served versions of `name`, newest first (the asked one first when given).

        Raises ModelNotFound for a name or version never seen, ModelUnavailable for
        one that is loading, failed or retiring."""
        versions = self.versions(name)
        if not versions:
            raise self.states.not_ready(name) or ModelNotFound(f"model {name!r} is not served")
        if version:
            key = version_key(version)
            asked = [v for v in versions if v.version == key]
            if not asked:
                raise self.states.not_ready(name, key) or ModelNotFound(
                    f"model {name!r} has no version {version!r}"
                )
            versions = asked + [v for v in versions if v.version != key]
        return versions

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

    def list_models(
        self, task: Task | None = None, *, ready_only: bool = False
    ) -> list[ModelEntry]:
        """Every model the repository knows (`ready_only`: those with a ready version)."""
        entries = []
        for name in sorted(set(self._served) | set(self.states.names())):
            statuses = tuple(self.states.of(name))
            versions = self.versions(name)
            if not versions:
                known = next((s.task for s in statuses if s.task is not None), None)
                if ready_only or (task is not None and known is not task):
                    continue
                entries.append(
                    ModelEntry(
                        name=name, versions=(), task=known, labels=(), backend="",
                        precision="", device="", limits=Limits(), max_batch=0,
                        is_default=False, statuses=statuses,
                    )
                )  # fmt: skip
                continue
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
                    statuses=statuses,
                )
            )
        return entries


def _task_of(versions: dict[str, LoadedVersion]) -> Task:
    return versions[max(versions, key=int)].manifest.task

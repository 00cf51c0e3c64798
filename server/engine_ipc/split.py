"""The engine serving some tasks only (`engine_tasks`), the front ends the rest.

    headrace serve --models ./models --workers 1 --engine-process --engine-tasks generate

Both sides scan the same repository folder. The engine's ModelRepository serves the
version folders whose manifest names one of its tasks; each front end's SplitRepository
joins the engine's catalog (RemoteRepository) and a ModelRepository of its own for
every other version, so the services see one repository:

    transport -> service -> SplitRepository -+- RemoteRepository -> engine process  (generate)
                                             +- ModelRepository  -> backend here     (classify)

Lookups, leases, defaults, model lists, states and health come from the two served sets
joined; each side loads, hot-reloads and retires its own versions. While the engine is
gone only its versions show as loading: Classify still answers, Generate gets
UNAVAILABLE. A folder whose manifest names no task (unreadable, or not JSON) is the
front end's, which marks it failed with the reason.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from headrace.server.config import ServerConfig
from headrace.server.engine_ipc.remote import RemoteRepository
from headrace.server.loader import LoadedVersion
from headrace.server.manifest import MANIFEST_NAME
from headrace.server.model_state import ModelStates
from headrace.server.repository import ModelRepository
from headrace.server.types import Task

ALL_TASKS = frozenset(Task)
_MAX_SEEN = 4096  # cached manifests; past it the cache starts over


def _task_at(version_dir: Path) -> Task | None:
    """The task a version folder's manifest names; None when it names none we know."""
    try:
        data = json.loads((version_dir / MANIFEST_NAME).read_bytes())
        return Task(data["task"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class TaskFilter:
    """A repository's `serves`: the version folders whose manifest names one of `tasks`
    (`unreadable`: and those whose manifest names no task). Each manifest is read once
    per change of its mtime."""

    def __init__(self, tasks: frozenset[Task], *, unreadable: bool) -> None:
        self.tasks = tasks
        self.unreadable = unreadable
        self._seen: dict[Path, tuple[int, Task | None]] = {}

    def __call__(self, version_dir: Path) -> bool:
        try:
            mtime = (version_dir / MANIFEST_NAME).stat().st_mtime_ns
        except OSError:
            return self.unreadable
        seen = self._seen.get(version_dir)
        if seen is None or seen[0] != mtime:
            if len(self._seen) >= _MAX_SEEN:
                self._seen.clear()
            seen = self._seen[version_dir] = (mtime, _task_at(version_dir))
        task = seen[1]
        return self.unreadable if task is None else task in self.tasks


def engine_filter(config: ServerConfig) -> TaskFilter | None:
    """The engine process's `serves` (None: it serves every version)."""
    tasks = config.engine_task_set()
    return None if tasks == ALL_TASKS else TaskFilter(tasks, unreadable=False)


def front_end_repository(config: ServerConfig) -> ModelRepository:
    """A front end's repository: the engine's catalog, and the other tasks' models here."""
    assert config.engine_socket is not None
    remote = RemoteRepository(
        config.engine_socket,
        profile=config.profile,
        defaults=config.defaults(),
        stream=config.stream_defaults(),
        connect_timeout_s=config.load_timeout_s,
    )
    tasks = config.engine_task_set()
    if tasks == ALL_TASKS:
        return remote
    serves = TaskFilter(ALL_TASKS - tasks, unreadable=True)
    return SplitRepository(ModelRepository.from_config(config, serves=serves), remote)


class SplitRepository(ModelRepository):
    """The engine's versions and this process's own as one repository (module docstring)."""

    def __init__(self, local: ModelRepository, remote: RemoteRepository) -> None:
        super().__init__(
            local.root, profile=local.requested_profile, poll_interval_s=0,
            defaults=local.defaults, stream=local.stream,
        )  # fmt: skip
        self.local = local
        self.remote = remote
        local.add_listener(self._join)
        remote.add_listener(self._join)

    async def start(self) -> None:
        await self.remote.start()  # the engine's catalog first: it loaded its models
        try:
            await self.local.start()
        except BaseException:
            await self.remote.stop(drain=False)
            raise
        self.profile = self.local.profile
        await self._join()

    async def stop(self, *, drain: bool = True) -> None:
        await asyncio.gather(self.local.stop(drain=drain), self.remote.stop(drain=drain))

    async def refresh(self) -> bool:
        return await self.local.refresh()  # the engine rescans its own

    async def _join(self) -> None:
        served: dict[str, dict[str, LoadedVersion]] = {}
        states = ModelStates()
        for part in (self.local, self.remote):
            for name, versions in part._served.items():
                served.setdefault(name, {}).update(versions)
            for name in part.states.names():
                for s in part.states.of(name):
                    states.set(name, s.version, s.state, reason=s.reason, task=s.task)
        self._served = served
        self.states = states
        await self._notify()

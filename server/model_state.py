"""The load state of every model version the repository knows, and what callers are told of it.

    LOADING   its folder was found: manifest read, backend loading and starting
    READY     started and served
    FAILED    could not be loaded; `reason` says why in one line, without file paths.
              Tried again when its manifest changes.
    RETIRING  its folder was removed; it finishes its in-flight calls, then is forgotten

ListModels shows every version with its state; a call to a model that has versions
but none READY gets UNAVAILABLE naming their states (`ModelUnavailable`), while a name
the repository has never seen stays NOT_FOUND, and so does a removed (RETIRING)
version: it is not coming back, so a caller should not retry it. Only the repository writes here (on
its event loop); everything else reads.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from headrace.server.errors import ModelUnavailable
from headrace.server.manifest import Limits
from headrace.server.types import Task

MAX_REASON = 300  # characters of a failure reason shown to callers


class ModelState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    RETIRING = "retiring"


@dataclass(frozen=True)
class VersionStatus:
    """One version's state; `task` is known once its manifest was read."""

    version: str
    state: ModelState
    reason: str = ""  # FAILED: why, one line, no paths
    task: Task | None = None

    @property
    def number(self) -> int:
        return int(self.version)

    def describe(self) -> str:
        """'version 2 failed to load: <reason>', 'version 3 is loading', ..."""
        if self.state is ModelState.FAILED:
            return f"version {self.version} failed to load: {self.reason or 'unknown error'}"
        return f"version {self.version} is {self.state.value}"


@dataclass(frozen=True)
class ModelEntry:
    """What ListModels and `headrace models` show for one model name.

    A model with no ready version has only `name`, `statuses` and (when its manifest
    could be read) `task`; the rest is that of its newest ready version."""

    name: str
    versions: tuple[str, ...]  # ready versions, newest first
    task: Task | None
    labels: tuple[str, ...]
    backend: str
    precision: str
    device: str
    limits: Limits
    max_batch: int
    is_default: bool
    statuses: tuple[VersionStatus, ...] = ()  # every known version, newest first

    @property
    def ready(self) -> bool:
        return bool(self.versions)

    @property
    def state(self) -> ModelState:
        """READY with a ready version, else the state of the newest version."""
        if self.versions or not self.statuses:
            return ModelState.READY
        return self.statuses[0].state


class ModelStates:
    """(name, version) -> VersionStatus, for every version found in the repository."""

    def __init__(self) -> None:
        self._by_name: dict[str, dict[str, VersionStatus]] = {}
        self.changes = 0  # counts every change (the repository tells its listeners)

    def set(
        self,
        name: str,
        version: str,
        state: ModelState,
        *,
        reason: str = "",
        task: Task | None = None,
    ) -> None:
        versions = self._by_name.setdefault(name, {})
        old = versions.get(version)
        if task is None and old is not None:
            task = old.task
        new = VersionStatus(version, state, reason, task)
        if new != old:
            versions[version] = new
            self.changes += 1

    def forget(self, name: str, version: str) -> None:
        versions = self._by_name.get(name)
        if versions is None or versions.pop(version, None) is None:
            return
        if not versions:
            del self._by_name[name]
        self.changes += 1

    def get(self, name: str, version: str) -> VersionStatus | None:
        return self._by_name.get(name, {}).get(version)

    def of(self, name: str) -> list[VersionStatus]:
        """Every known version of `name`, newest first."""
        return sorted(self._by_name.get(name, {}).values(), key=lambda s: -s.number)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def ready(self, name: str) -> bool:
        return any(s.state is ModelState.READY for s in self._by_name.get(name, {}).values())

    def not_ready(self, name: str, version: str | None = None) -> ModelUnavailable | None:
        """The error for a call to `name` (or one version of it) that no READY version
        can take, or None when the repository has never seen it (NOT_FOUND)."""
        if version is not None:
            status = self.get(name, version)
            if status is None or status.state in (ModelState.READY, ModelState.RETIRING):
                return None
            return ModelUnavailable(f"model {name!r} {status.describe()}")
        statuses = [s for s in self.of(name) if s.state is not ModelState.RETIRING]
        if not statuses or any(s.state is ModelState.READY for s in statuses):
            return None
        return ModelUnavailable(
            f"model {name!r} has no ready version ({'; '.join(s.describe() for s in statuses)})"
        )

    def not_ready_for_task(self, task: Task) -> ModelUnavailable | None:
        """The error for a call naming no model when no model of `task` is READY but
        some version of that task is loading, failed or retiring."""
        waiting = [
            (name, s)
            for name, versions in sorted(self._by_name.items())
            for s in sorted(versions.values(), key=lambda s: -s.number)
            if s.task is task and s.state in (ModelState.LOADING, ModelState.FAILED)
        ]
        if not waiting:
            return None
        what = "; ".join(f"{name} {s.describe()}" for name, s in waiting)
        return ModelUnavailable(f"no {task.value} model is ready ({what})")


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/[^\s/'\"():,;]+)+/?")


def safe_reason(exc: BaseException, version_dir: Path, label: str) -> str:
    """`exc` as one line a caller may read: the version folder shown as `label`
    (NAME/VERSION), any other absolute path cut to its file name, at most MAX_REASON."""
    text = str(exc) or type(exc).__name__
    for folder in {str(version_dir.resolve()), str(version_dir)}:
        text = text.replace(folder, label)
    text = _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    text = " ".join(text.split())
    if not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."

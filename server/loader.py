"""Loading one model version: manifest -> artifact choice -> tokenizer + backend -> started model.

    loader = VersionLoader(profile="cpu", device=None, backend=None, options={}, timeout_s=300)
    loaded = await loader.load("sentiment", "3", Path("models/sentiment/3"))  # or LoadFailed

A load runs in a thread of its own (a daemon: a hung load never keeps the process
from exiting), under `timeout_s` for the whole of it. A load past its time fails with
"load timed out after N s" and the repository goes on with the other versions; should
the abandoned thread finish later, what it built is closed. A failure's reason is one
line without file paths (server/model_state.safe_reason), safe to show callers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from headrace.server.backends.base import BackendSpec, task_options
from headrace.server.backends.registry import load_decoder, load_encoder
from headrace.server.logs import get_logger
from headrace.server.manifest import Manifest, read_manifest
from headrace.server.model_state import safe_reason
from headrace.server.models import ClassifierModel, GeneratorModel, ServedModel, load_tokenizer
from headrace.server.profiles import Choice, choose_artifact
from headrace.server.types import StreamInterval, Task

log = get_logger("headrace.repository")

T = TypeVar("T")


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


class LoadFailed(Exception):
    """A version that cannot be served; `reason` is safe to show callers."""

    def __init__(self, reason: str, task: Task | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.task = task  # known when the manifest was read


class VersionLoader:
    def __init__(
        self,
        *,
        profile: str,
        device: str | None,
        backend: str | None,
        options: Mapping[str, object],
        timeout_s: float,
        stream: StreamInterval | None = None,
    ) -> None:
        self.profile = profile
        self.device = device
        self.backend = backend
        self.options = dict(options)
        self.timeout_s = timeout_s  # 0: no limit
        self.stream = stream or StreamInterval()  # a generator stream's default message rule

    async def load(
        self, name: str, version: str, path: Path, *, on_task: Callable[[Task], None] | None = None
    ) -> LoadedVersion:
        """Load and start one version. Raises LoadFailed (CancelledError passes through).

        `on_task(task)` is called once the manifest is read."""
        task: Task | None = None
        try:
            async with asyncio.timeout(self.timeout_s or None):
                manifest = await _in_thread(read_manifest, path, name=f"load-{name}-{version}")
                task = manifest.task
                if on_task is not None:
                    on_task(task)
                choice = choose_artifact(manifest, self.profile, self.device, self.backend)
                model = await _in_thread(
                    self._build_model,
                    name,
                    version,
                    path,
                    manifest,
                    choice,
                    name=f"load-{name}-{version}",
                    discard=_close_late,
                )
                try:
                    await model.start()
                except BaseException:
                    await asyncio.to_thread(model.close)
                    raise
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            reason = f"load timed out after {self.timeout_s:g} s"
            log.warning("model_version_skipped", model=name, model_version=version, reason=reason)
            raise LoadFailed(reason, task) from None
        except Exception as exc:
            reason = safe_reason(exc, path, f"{name}/{version}")
            log.warning("model_version_skipped", model=name, model_version=version, reason=reason)
            raise LoadFailed(reason, task) from exc
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
            options=task_options(self.options, manifest.task, choice.backend),
        )
        tokenizer = load_tokenizer(path / manifest.tokenizer)
        if manifest.task is Task.CLASSIFY:
            return ClassifierModel(name, version, manifest, load_encoder(spec), tokenizer)
        model = GeneratorModel(name, version, manifest, load_decoder(spec), tokenizer)
        model.stream = self.stream
        return model


def _close_late(model: Any) -> None:
    log.warning("model_version_load_finished_late", model=model.name, model_version=model.version)
    model.close()


async def _in_thread(
    fn: Callable[..., T], *args: Any, name: str, discard: Callable[[T], None] | None = None
) -> T:
    """`fn(*args)` in a new daemon thread. Unlike asyncio.to_thread, a call that never
    returns holds no executor worker and does not block the interpreter's exit.

    If the awaiting task is cancelled (the load timed out), a result that arrives later
    is handed to `discard` in the thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    lock = threading.Lock()
    abandoned = False

    def deliver(ok: bool, value: Any) -> None:  # on the loop
        if future.done():  # cancelled between the thread's check and now
            if ok and discard is not None:
                threading.Thread(target=discard, args=(value,), daemon=True).start()
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def work() -> None:
        try:
            value: Any = fn(*args)
            ok = True
        except BaseException as exc:  # delivered to the awaiting task
            value, ok = exc, False
        with lock:
            late = abandoned
        if late:
            if ok and discard is not None:
                discard(value)
            elif not ok:
                log.warning(
                    "model_version_load_ended_late", thread=name, error=type(value).__name__
                )
            return
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:  # the loop is closed: nobody waits any more
            if ok and discard is not None:
                discard(value)

    threading.Thread(target=work, name=name, daemon=True).start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with lock:
            abandoned = True
        future.cancel()  # a result already on its way to the loop goes to `discard`
        raise

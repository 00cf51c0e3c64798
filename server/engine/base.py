"""What the encoder batcher and the decoder scheduler share: how an engine starts and stops.

Each engine has one worker thread that alone calls its backend, and one task on the
event loop (`_run`):

    start()  starts the worker thread and runs `_warm_up` there once (a backend's first
             call allocates: not on a request's time), then starts `_run`
    stop()   takes no new work (`_check_open` raises ShuttingDown); with drain=False it
             first fails what is queued or running (`_abandon`); `_on_close` tells the
             engine, whose `_run` ends once its work is done; then the thread goes
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, TypeVar

from headrace.server.threads import set_os_thread_name
from headrace.server.types import ShuttingDown

T = TypeVar("T")


class Engine:
    kind: ClassVar[str]  # "encoder" | "decoder": names the thread and the task

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._unit_s: float | None = None  # running mean of one unit (a batch; a sequence)

    def _observe_unit(self, seconds: float) -> None:
        u = self._unit_s
        self._unit_s = seconds if u is None else u + 0.1 * (seconds - u)

    def retry_after_s(self, units_ahead: float) -> float:
        """The retry hint of a QueueFull: the time to work through `units_ahead` units,
        within [10 ms, 10 s] (a jittered client retry spreads around it)."""
        unit = 0.1 if self._unit_s is None else self._unit_s  # nothing measured yet
        return min(10.0, max(0.01, units_ahead * unit))

    async def start(self) -> None:
        if self._task is not None:
            return
        thread = f"{self.kind}-{self.name}"
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=thread, initializer=set_os_thread_name, initargs=(thread,)
        )
        await self._in_worker(self._warm_up)
        self._task = asyncio.create_task(self._run(), name=f"{self.kind}-engine-{self.name}")

    async def stop(self, *, drain: bool = True) -> None:
        """Take no new work; finish what is queued and running (drain) or fail it."""
        self._closing = True
        if not drain:
            self._abandon(ShuttingDown("the model is shutting down"))
        self._on_close()
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _check_open(self) -> None:
        if self._closing or self._task is None:
            raise ShuttingDown("the model is not serving")

    async def _in_worker(self, fn: Callable[..., T], *args: object) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- what each engine adds --------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the backend."""
        raise NotImplementedError

    def _warm_up(self) -> None:
        """Worker thread: one small backend call."""
        raise NotImplementedError

    async def _run(self) -> None:
        """Event loop: the engine's loop; returns when closing and its work is done."""
        raise NotImplementedError

    def _abandon(self, error: ShuttingDown) -> None:
        """Event loop: fail every queued and running request with `error`."""
        raise NotImplementedError

    def _on_close(self) -> None:
        """Event loop: `_closing` was just set; let `_run` see it."""
        raise NotImplementedError

"""The engine process: one per device; the models, their batchers and decode loops.

    python -m headrace.server.engine_ipc.engine     (started by the supervisor, never by hand)

It runs the same ModelRepository a whole server runs (loading, hot reload, retiring
versions), and answers front ends on a Unix domain socket (server/engine_ipc/wire.py)
instead of gRPC: token ids in, logits or token events out. It tokenizes nothing on
the classify path (the front ends send ids) and knows nothing of gRPC, HTTP or callers.

- Every front end gets the catalog (served versions, every version's state) when it
  connects and after every change, so model lists, health and model states come from here.
- A classify call goes to the model's EncoderBatcher with its rows of ids: the batch
  gathers every front end's rows.
- A generate call becomes a sequence of the model's DecoderScheduler; its token events
  go back as TOKENS frames. A CANCEL frame, or its front end's connection closing,
  ends the sequence, and the scheduler frees its slot at the next step.
- SIGTERM: new calls get ShuttingDown (UNAVAILABLE), admitted ones finish (at most the
  grace period), then the models stop and the process exits 0. The supervisor signals
  it once every front end has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from headrace.server import tracing
from headrace.server.config import ServerConfig, load_config
from headrace.server.engine_ipc import wire
from headrace.server.engine_ipc.split import engine_filter
from headrace.server.errors import ServiceError
from headrace.server.heap import freeze_startup_heap
from headrace.server.logs import configure_logging, get_logger
from headrace.server.models import ClassifierModel, GeneratorModel
from headrace.server.repository import ModelRepository
from headrace.server.types import EngineError, ShuttingDown

log = get_logger("headrace.engine")

SOCKET_ENV = "HEADRACE_ENGINE_SOCKET"
READY_SUFFIX = ".ready"


def catalog(repository: ModelRepository) -> dict[str, Any]:
    """What the front ends need to serve the repository's models without loading them."""
    versions = []
    for name in repository.names():
        for v in repository.versions(name):
            model = v.model
            entry: dict[str, Any] = {
                "name": v.name, "version": v.version, "path": str(v.path),
                "backend": v.choice.backend, "device": v.choice.device,
                "artifact": v.manifest.artifacts.index(v.choice.artifact),
            }  # fmt: skip
            if isinstance(model, GeneratorModel):
                entry["vocab_size"] = model.backend.vocab_size
                entry["max_context"] = model.max_context
            versions.append(entry)
    states = [
        {"name": name, "version": s.version, "state": s.state.value, "reason": s.reason,
         "task": s.task.value if s.task is not None else None}
        for name in repository.states.names()
        for s in repository.states.of(name)
    ]  # fmt: skip
    return {"profile": repository.profile, "versions": versions, "states": states}


def _log_unexpected(exc: Exception, call_id: int) -> None:
    """The caller gets INTERNAL without the text: the cause goes to the engine's log."""
    if not isinstance(exc, EngineError | ServiceError):
        log.error("engine_call_failed", call_id=call_id, exc_info=exc)


class Engine:
    def __init__(self, config: ServerConfig, socket_path: Path) -> None:
        assert config.models is not None
        self.config = config
        self.socket_path = socket_path
        # engine_tasks: only those tasks' versions (server/engine_ipc/split.py)
        self.repository = ModelRepository.from_config(config, serves=engine_filter(config))
        self.senders: set[wire.Sender] = set()
        self.calls: set[asyncio.Task[None]] = set()
        self.stopping = False
        self._stopping: asyncio.Future[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        await self.repository.start()
        self.repository.add_listener(self._broadcast)
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        freeze_startup_heap()  # the models loaded: out of every full collection's scan
        ready = self.socket_path.with_name(self.socket_path.name + READY_SUFFIX)
        ready.write_text(f"{os.getpid()}\n")
        log.info("engine_serving", socket=str(self.socket_path), models=self.repository.names(),
                 profile=self.repository.profile, pid=os.getpid())  # fmt: skip

    async def _broadcast(self) -> None:
        data = wire.catalog_frame(catalog(self.repository))
        for sender in list(self.senders):
            sender.send(data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = wire.Sender(writer)
        self.senders.add(sender)
        sender.send(wire.catalog_frame(catalog(self.repository)))
        running: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                kind, call_id, body = await wire.read_frame(reader)
                if kind == wire.CANCEL:
                    task = running.pop(call_id, None)
                    if task is not None:
                        task.cancel()
                    continue
                if kind == wire.PING:
                    sender.send(wire.frame(wire.PONG, call_id))
                    continue
                if self.stopping:
                    sender.send(wire.error_frame(call_id, ShuttingDown("the engine is stopping")))
                    continue
                if kind == wire.CLASSIFY:
                    coro = self._classify(sender, call_id, body)
                elif kind == wire.GENERATE:
                    coro = self._generate(sender, call_id, body)
                else:
                    raise ValueError(f"unknown frame kind {kind}")
                task = asyncio.create_task(coro)
                running[call_id] = task
                self.calls.add(task)
                task.add_done_callback(self.calls.discard)
                task.add_done_callback(lambda t, i=call_id: running.pop(i, None))  # type: ignore[misc]
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front end went away: what it started ends below
        except Exception:
            log.exception("engine_connection_failed")
        finally:
            self.senders.discard(sender)
            for task in running.values():
                task.cancel()
            writer.close()

    async def _classify(self, sender: wire.Sender, call_id: int, body: memoryview) -> None:
        try:
            name, version, rows = wire.parse_classify(body)
            async with self.repository.lease(name, version, ClassifierModel) as lease:
                out = await lease.model.batcher.submit(rows)
            sender.send(wire.scores_frame(call_id, out.logits, out.tokens))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log_unexpected(exc, call_id)
            sender.send(wire.error_frame(call_id, exc))

    async def _generate(self, sender: wire.Sender, call_id: int, body: memoryview) -> None:
        try:
            name, version, params = wire.parse_generate(body)
            async with self.repository.lease(name, version, GeneratorModel) as lease:
                # each step's events framed in its delivery: no task wakes per token
                await lease.model.forward(
                    params, lambda event: sender.send(wire.tokens_frame(call_id, event))
                )  # cancelled (CANCEL, the front end gone): the slot is freed at the next step
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log_unexpected(exc, call_id)
            sender.send(wire.error_frame(call_id, exc))

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self._stopping = asyncio.ensure_future(self._stop())

    async def _stop(self) -> None:
        log.info("engine_draining", calls=len(self.calls))
        if self.calls:
            await asyncio.wait(set(self.calls), timeout=self.config.grace_period_s or None)
        for task in list(self.calls):
            task.cancel()
        self._server.close()
        await self.repository.stop(drain=False)
        self.socket_path.unlink(missing_ok=True)
        log.info("stopped")
        self._stopped.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        await self.start()
        await self._stopped.wait()
        return 0


def _main() -> int:
    import threading

    import structlog
    from headrace.server.workers import CONFIG_ENV, _drain_when_orphaned

    config = load_config(None, json.loads(os.environ[CONFIG_ENV]))
    configure_logging(config.log_format, config.log_level)
    structlog.contextvars.bind_contextvars(worker="engine", pid=os.getpid())
    tracing.configure(config.otlp_endpoint)
    threading.Thread(target=_drain_when_orphaned, args=(os.getppid(),), daemon=True).start()
    engine = Engine(config, Path(os.environ[SOCKET_ENV]))
    try:
        import uvloop
    except ImportError:
        return asyncio.run(engine.run())
    with contextlib.suppress(KeyboardInterrupt):
        return int(uvloop.run(engine.run()))
    return 0


if __name__ == "__main__":
    sys.exit(_main())

"""`headrace serve --workers N --engine-process`: one engine process, N front ends.

    headrace serve --models ./models --profile datacenter --workers 4

The supervisor of server/workers.py, plus the engine (server/engine_ipc/engine.py):

- the engine starts first and loads every model; the front ends start once it serves
  (an engine that fails to start stops the whole start, as a worker's failure does);
- each front end gets the engine's socket (`engine_socket`): its repository is the
  engine's catalog (server/engine_ipc/remote.py), it loads no model (with
  `engine_tasks`, only the other tasks' models: server/engine_ipc/split.py);
- an engine that dies is restarted (with the workers' backoff); meanwhile the front ends
  answer UNAVAILABLE and reconnect by themselves;
- SIGTERM: the front ends drain first (their calls run on the engine), then the engine
  gets SIGTERM, finishes what is admitted, stops its models and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from headrace.server.config import ServerConfig
from headrace.server.engine_ipc.engine import READY_SUFFIX, SOCKET_ENV
from headrace.server.logs import get_logger
from headrace.server.workers import (
    CONFIG_ENV,
    MULTIPROC_ENV,
    RESTART_BACKOFF_S,
    STABLE_S,
    Supervisor,
    _to_json,
)

log = get_logger("headrace.workers")


class EngineSupervisor(Supervisor):
    def __init__(self, config: ServerConfig, n: int) -> None:
        super().__init__(config, n)
        self.socket = self.root / "engine.sock"
        self.ready_file = self.root / ("engine.sock" + READY_SUFFIX)
        self.engine: subprocess.Popen[bytes] | None = None
        self.engine_started = 0.0
        self.engine_failures = 0

    def _env(self, index: int) -> dict[str, str]:
        env = super()._env(index)
        child = json.loads(env[CONFIG_ENV])
        child["engine_socket"] = str(self.socket)
        env[CONFIG_ENV] = json.dumps(child)
        return env

    def _spawn_engine(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        engine_config = dataclasses.replace(
            self.config, workers=1, metrics_port=0, port_file=None, reuse_port=False
        )
        env = dict(os.environ)
        env[CONFIG_ENV] = _to_json(engine_config)
        env[SOCKET_ENV] = str(self.socket)
        env[MULTIPROC_ENV] = str(self.root / "metrics")
        self.engine = subprocess.Popen(
            [sys.executable, "-m", "headrace.server.engine_ipc.engine"],
            env=env,
            process_group=0,
        )
        self.engine_started = time.monotonic()
        log.info("engine_started", engine_pid=self.engine.pid, socket=str(self.socket))

    def _before_workers(self) -> bool:
        self._spawn_engine()
        assert self.engine is not None
        while not self.ready_file.exists():
            rc = self.engine.poll()
            if rc is not None:
                log.error("engine_failed_to_start", code=rc)
                return False
            if self._stop.wait(0.1):
                self._after_workers(kill=False)
                return False
        return True

    def _tick(self) -> None:
        engine = self.engine
        if engine is None or engine.poll() is None:
            if engine is not None and time.monotonic() - self.engine_started > STABLE_S:
                self.engine_failures = 0
            return
        self._mark_dead(engine.pid)
        wait = RESTART_BACKOFF_S[min(self.engine_failures, len(RESTART_BACKOFF_S) - 1)]
        log.warning("engine_died", engine_pid=engine.pid, code=engine.returncode,
                    restart_in_s=wait)  # fmt: skip
        if self._stop.wait(wait):
            self.engine = None
            return
        self.engine_failures += 1
        self._spawn_engine()

    def _after_workers(self, *, kill: bool) -> list[int]:
        engine = self.engine
        if engine is None or engine.poll() is not None:
            return []
        if kill:
            engine.kill()
            engine.wait()
            return []
        with contextlib.suppress(ProcessLookupError):
            engine.send_signal(signal.SIGTERM)
        try:
            code = engine.wait(self.config.grace_period_s + 15.0)
        except subprocess.TimeoutExpired:
            log.warning("engine_killed", engine_pid=engine.pid)
            engine.kill()
            code = engine.wait()
        return [code]


def run_engine_workers(config: ServerConfig, n: int) -> int:
    """Blocking: an engine and `n` front ends until a signal and their drain."""
    return EngineSupervisor(config, n).run()

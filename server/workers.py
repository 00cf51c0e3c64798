"""`headrace serve --workers N`: N front-end processes on one port, and their supervisor.

    headrace serve --models ./models --workers 2 --http-port 8000 --metrics-port 9464

The supervisor (this module, in the process `headrace serve` started) loads no model. It
starts N workers, each a whole headrace server (server/app.py: the native, KServe and
HTTP fronts, health, reflection, and its own backend sessions), all bound to the same
gRPC and HTTP ports with SO_REUSEPORT: the kernel spreads new connections over the
workers (a connection, and every call on it, stays with one worker). Then it

- restarts a worker that dies after it was serving (a worker that fails while starting
  stops the whole start: the same error would repeat);
- forwards SIGTERM / SIGINT to every worker, which drain as one server does (health
  NOT_SERVING, new calls UNAVAILABLE, running calls get the grace period), and exits 0
  when all have; a second signal is forwarded too (the workers stop waiting);
- keeps the port: with `--port 0` it binds a free port itself (SO_REUSEPORT, never
  listening, so it takes no connection) and hands that number to every worker and to a
  restarted one; `--port-file` is written once every worker serves;
- serves the one metrics view on `--metrics-port`: workers write their samples to a
  shared folder (prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR);
  counters and histograms are summed over the workers, the gauges (queue depth, active
  slots) too (`livesum`: the workers alive now). A worker's HTTP `/metrics` gives the
  same sums.

CPU: backend threads are split so that workers x intra-op threads <= cores, unless
`intra_op_threads` is set. Every log line of a worker carries `pid` and `worker`.
The default N is one per 2 cores, at most MAX_DEFAULT_WORKERS, and 1 for the
datacenter profile (one process per GPU: docs/datacenter.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from headrace.server.config import ServerConfig, load_config
from headrace.server.logs import configure_logging, get_logger

log = get_logger("headrace.workers")

MAX_DEFAULT_WORKERS = 8
CONFIG_ENV = "HEADRACE_WORKER_CONFIG"  # a worker's ServerConfig, as JSON
INDEX_ENV = "HEADRACE_WORKER_INDEX"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)  # waits before restarting a worker that keeps dying
STABLE_S = 30.0  # a worker up this long resets its backoff


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(profile: str) -> int:
    """One per 2 cores, capped; 1 for the datacenter profile (and for auto with CUDA)."""
    if profile == "datacenter":
        return 1
    n = max(1, min(MAX_DEFAULT_WORKERS, cores() // 2))
    if n > 1 and profile == "auto":
        from headrace.server.profiles import cuda_available

        if cuda_available():
            return 1
    return n


def worker_config(config: ServerConfig, n: int, port: int, port_file: Path) -> ServerConfig:
    """What each of `n` workers runs: the shared port, its own threads, no metrics port."""
    threads = config.intra_op_threads or max(1, cores() // n)
    decoder = config.decoder_intra_op_threads
    return dataclasses.replace(
        config,
        port=port,
        port_file=port_file,
        metrics_port=0,
        workers=1,
        reuse_port=True,
        intra_op_threads=threads,
        decoder_intra_op_threads=None if decoder is None else min(decoder, threads),
    )


def _to_json(config: ServerConfig) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return list(value)
        return value

    return json.dumps({k: plain(v) for k, v in dataclasses.asdict(config).items()})


def _reserve(host: str, port: int) -> socket.socket | None:
    """For port 0: a free port of our own in the workers' SO_REUSEPORT group (never listening)."""
    if port != 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


@dataclasses.dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    port_file: Path
    serving: bool = False
    failures: int = 0  # deaths in a row without STABLE_S of service
    signalled: int = 0  # SIGTERMs forwarded to it


class Supervisor:
    def __init__(self, config: ServerConfig, n: int) -> None:
        self.config = config
        self.n = n
        self._tmp = tempfile.TemporaryDirectory(prefix="headrace-workers-")
        self.root = Path(self._tmp.name)
        (self.root / "metrics").mkdir()
        self._reserved = _reserve(config.host, config.port)
        self.port = self._reserved.getsockname()[1] if self._reserved else config.port
        self.workers: list[_Worker] = []
        self._stop = threading.Event()
        self._signals = 0

    def _env(self, index: int) -> dict[str, str]:
        child = worker_config(self.config, self.n, self.port, self._port_file(index))
        env = dict(os.environ)
        env[CONFIG_ENV] = _to_json(child)
        env[INDEX_ENV] = str(index)
        env[MULTIPROC_ENV] = str(self.root / "metrics")
        return env

    def _port_file(self, index: int) -> Path:
        return self.root / f"worker-{index}.port"

    def _spawn(self, index: int, failures: int = 0) -> _Worker:
        self._port_file(index).unlink(missing_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "headrace.server.workers"],
            env=self._env(index),
            process_group=0,  # a terminal's Ctrl-C reaches the supervisor alone, which forwards
        )
        log.info("worker_started", worker=index, worker_pid=proc.pid, port=self.port)
        return _Worker(index, proc, time.monotonic(), self._port_file(index), failures=failures)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self._stop.set()
        self._forward()

    def _forward(self) -> None:
        """Every worker gets one SIGTERM per signal the supervisor got (a late one too)."""
        for w in self.workers:
            while w.signalled < self._signals and w.proc.poll() is None:
                w.signalled += 1
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        import structlog

        structlog.contextvars.bind_contextvars(pid=os.getpid(), worker="supervisor")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        metrics = self._serve_metrics()
        try:
            if not self._before_workers():
                return 1
            self.workers = [self._spawn(i) for i in range(self.n)]
            return self._watch()
        finally:
            if metrics is not None:
                metrics.shutdown()
            self._after_workers(kill=True)
            for w in self.workers:
                if w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
            if self._reserved is not None:
                self._reserved.close()
            self._tmp.cleanup()

    def _serve_metrics(self) -> Any:
        if not self.config.metrics_port:
            return None
        os.environ[MULTIPROC_ENV] = str(self.root / "metrics")
        from headrace.server.metrics import serve_metrics

        server = serve_metrics(self.config.metrics_port, host=self.config.host)
        log.info("metrics", host=self.config.host, port=self.config.metrics_port, path="/metrics")
        return server

    def _watch(self) -> int:
        announced = False
        while True:
            if self._stop.is_set():
                return self._drain()
            self._tick()
            for i, w in enumerate(self.workers):
                if not w.serving and w.port_file.exists():
                    w.serving = True
                rc = w.proc.poll()
                if rc is None:
                    if w.serving and time.monotonic() - w.started > STABLE_S:
                        w.failures = 0
                    continue
                if self._stop.is_set():
                    break
                if not w.serving:  # the same error would come again: give up the start
                    log.error("worker_failed_to_start", worker=w.index, code=rc)
                    self._on_signal(signal.SIGTERM, None)
                    self._drain()
                    return 1
                self._mark_dead(w.proc.pid)
                wait = RESTART_BACKOFF_S[min(w.failures, len(RESTART_BACKOFF_S) - 1)]
                log.warning("worker_died", worker=w.index, worker_pid=w.proc.pid, code=rc,
                            restart_in_s=wait)  # fmt: skip
                if self._stop.wait(wait):
                    break
                self.workers[i] = self._spawn(w.index, w.failures + 1)
            if not announced and all(w.serving for w in self.workers):
                announced = True
                if self.config.port_file is not None:
                    tmp = self.config.port_file.with_name(self.config.port_file.name + ".tmp")
                    tmp.write_text(f"{self.port}\n")
                    tmp.replace(self.config.port_file)
                log.info("serving", port=self.port, workers=self.n,
                         worker_pids=[w.proc.pid for w in self.workers])  # fmt: skip
            self._stop.wait(0.1)

    def _drain(self) -> int:
        """Wait for every worker's drain; the grace period plus a margin, then kill."""
        deadline = time.monotonic() + self.config.grace_period_s + 15.0
        while any(w.proc.poll() is None for w in self.workers):
            self._forward()  # a worker spawned while the signal came
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        codes = []
        for w in self.workers:
            if w.proc.poll() is None:
                log.warning("worker_killed", worker=w.index, worker_pid=w.proc.pid)
                w.proc.kill()
            codes.append(w.proc.wait())
        codes.extend(self._after_workers(kill=False))
        log.info("stopped", workers=self.n, codes=codes)
        return 0 if all(c == 0 for c in codes) else 1

    # -- what a supervisor with an engine process adds (server/engine_ipc/supervisor.py) --

    def _before_workers(self) -> bool:
        """Before the first worker starts; False stops the start."""
        return True

    def _tick(self) -> None:
        """Once per pass of the watch loop."""

    def _after_workers(self, *, kill: bool) -> list[int]:
        """Once every worker has exited: the exit codes of what else ran."""
        return []

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, str(self.root / "metrics"))  # type: ignore[no-untyped-call]


def run_workers(config: ServerConfig, n: int) -> int:
    """Blocking: supervise `n` workers until a signal and their drain. Returns the exit code."""
    return Supervisor(config, n).run()


def _drain_when_orphaned(parent: int) -> None:
    """The supervisor was killed (no signal forwarded): drain and stop as on SIGTERM."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _worker_main() -> int:
    """A worker: the config from the supervisor, then one whole server (server/app.py)."""
    import structlog

    config = load_config(None, json.loads(os.environ[CONFIG_ENV]))
    configure_logging(config.log_format, config.log_level)
    structlog.contextvars.bind_contextvars(worker=int(os.environ[INDEX_ENV]), pid=os.getpid())
    threading.Thread(target=_drain_when_orphaned, args=(os.getppid(),), daemon=True).start()
    from headrace.server.app import run

    return run(config)


if __name__ == "__main__":
    sys.exit(_worker_main())

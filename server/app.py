"""The grpc.aio server: Inference, the Open Inference Protocol, grpc.health.v1 and
server reflection on one port; the OpenAI-compatible HTTP front on another.

    async with serve_in_process(config) as server:   # tests and embedders
        channel = grpc.insecure_channel(server.address)

    headrace serve --models ./models                 # the CLI: run(config)

Health names: "" (the whole server), "headrace.v1.Inference",
"inference.GRPCInferenceService", and one per model name. Each is SERVING
while it can answer, NOT_SERVING while the server drains (a model's: while
none of its versions is ready, loading or failed, or after its last version
was removed).

With `http_port`, the HTTP front (server/http_api) serves the same models on
the same event loop; it binds before the models load, so `/health/live`
answers during a slow start and `/health/ready` turns 200 once they are in.

Security (docs/serving.md#security): with `tls_cert`/`tls_key` the port speaks
TLS only (`tls_client_ca`: client certificates required), with `api_key_file`
every call needs a key (server/auth.py), checked by one interceptor before any
service sees the call; both files are re-read when they change.

Shutdown (SIGTERM / SIGINT, or `stop()`), in this order, so a rolling restart
loses no call:
1. health goes NOT_SERVING (every name, Watch streams told), readiness false; calls
   are still served until no call came in for 0.25 s (clients that watch health,
   as the SDK's round_robin does, have moved), at most 2 s;
2. a graceful GOAWAY (grpc's `server.stop(grace)`): clients send new calls to their
   other addresses, and the port takes no new connection; the HTTP front stops
   accepting connections too; a call that still comes in gets UNAVAILABLE before it
   runs (HTTP: 503), which retry policies retry;
3. in-flight calls of every front (streams too) get `grace_period_s` to finish;
4. health Watch streams end (OK), what is left is cancelled, the models stop and the
   process exits 0.
In Kubernetes a preStop sleep comes before the SIGTERM, so the endpoint is gone from
the Service before the drain starts (docs/datacenter.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from headrace.server import tracing
from headrace.server.auth import Authenticator
from headrace.server.config import ServerConfig
from headrace.server.health import DrainingHealthServicer
from headrace.server.heap import freeze_startup_heap
from headrace.server.kserve.pb import grpc_service_pb2 as kserve_pb
from headrace.server.kserve.pb import grpc_service_pb2_grpc as kserve_grpc
from headrace.server.kserve.service import OpenInferenceService
from headrace.server.logs import get_logger
from headrace.server.repository import ModelRepository
from headrace.server.rpc import AuthInterceptor, Gate
from headrace.server.service import InferenceService
from headrace.server.tls import ServerTls, TlsFiles
from headrace.server.transport import GuardedRegistry, server_options
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from headrace.server.http_api import HttpFront

log = get_logger("headrace.server")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
KSERVE_SERVICE = kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Between NOT_SERVING and the GOAWAY calls are still served, and clients that watch
# health (the SDK's round_robin) leave within a round trip; the GOAWAY waits until no
# call came in for QUIET_S, at most SETTLE_MAX_S. grpc cancels (CANCELLED, never
# retried) a call that reaches a server already shutting down before its GOAWAY reached
# the client: 1 of 2,972 calls in tests/e2e/test_rolling_restart.py with the GOAWAY
# first. Refusing calls in this window instead sent the retries of clients that do not
# watch health back to the same replica: 665 of 3,294 failed.
QUIET_S = 0.25
SETTLE_MAX_S = 2.0


class Server:
    """One headrace server: the model repository and its gRPC services."""

    def __init__(self, config: ServerConfig) -> None:
        if config.models is None:
            raise ValueError("no model repository: set `models` (--models DIR)")
        self.config = config
        # Checked before any model loads: a bad certificate or key file stops the start.
        self.tls: ServerTls | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.tls = ServerTls(TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca))
        tracing.configure(config.otlp_endpoint)  # off unless an OTLP endpoint is set
        self.auth: Authenticator | None = None
        if config.api_key_file is not None:
            self.auth = Authenticator(config.api_key_file, config.auth_exempt)
        self.repository: ModelRepository
        if config.engine_socket is not None:  # a front end: the engine's models (some, or all)
            from headrace.server.engine_ipc.split import front_end_repository

            self.repository = front_end_repository(config)
        else:
            self.repository = ModelRepository.from_config(config)
        self.gate = Gate()  # drain flag and running calls of every front
        self.service = InferenceService(self.repository, self.gate)
        self.kserve = OpenInferenceService(self.repository, self.gate)
        self.http: HttpFront | None = None
        if config.http_port:
            from headrace.server.http_api import HttpFront

            self.http = HttpFront(self.repository, config, self.gate, self.auth, self.tls)
        self.health = DrainingHealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._model_names: set[str] = set()
        self._stopped = asyncio.Event()
        self._hurry = asyncio.Event()  # set: stop waiting for in-flight calls
        self._stopping: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Load the models, bind the port and start answering."""
        if self.http is not None:
            await self.http.start()
        try:
            await self._start_grpc()
        except BaseException:
            if self.http is not None:
                await self.http.stop()
            raise
        if self.http is not None:
            self.http.loading = False
        if self.config.port_file is not None:
            _write_atomic(self.config.port_file, f"{self.port}\n")
        if self.auth is not None and self.tls is None:
            log.warning("api_keys_without_tls", reason="API keys cross the network in clear text")
        log.info(
            "serving",
            host=self.config.host,
            port=self.port,
            http_port=self.http.port if self.http is not None else None,
            tls="mutual" if self.tls and self.tls.mutual else bool(self.tls),
            api_keys=self.auth.key_count if self.auth else 0,
            profile=self.repository.profile,
            models=self.repository.names(),
            pid=os.getpid(),
        )

    async def _start_grpc(self) -> None:
        await self.repository.start()
        server = grpc.aio.server(
            # keys first: nothing unauthenticated is parsed (the handlers refuse bytes that
            # do not parse: GuardedRegistry below)
            interceptors=[AuthInterceptor(self.auth)] if self.auth is not None else [],
            options=server_options(  # limits that never fire before a model's queue does
                self.config.max_message_mb * 1024 * 1024,
                max_connection_age_s=self.config.max_connection_age_s,
                grace_period_s=self.config.grace_period_s,
                reuse_port=self.config.reuse_port,  # --workers: one port, N processes
            ),
        )
        registry: Any = GuardedRegistry(server)
        pb_grpc.add_InferenceServicer_to_server(self.service, registry)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(self.kserve, registry)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registry)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, KSERVE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        host = self.config.host
        target = f"[{host}]:{self.config.port}" if ":" in host else f"{host}:{self.config.port}"
        try:
            if self.tls is not None:
                self.port = server.add_secure_port(target, self.tls.grpc_credentials())
            else:
                self.port = server.add_insecure_port(target)
        except RuntimeError as exc:
            await self.repository.stop(drain=False)
            raise OSError(f"cannot listen on {target}: {exc}") from exc
        self._grpc = server
        await server.start()
        await self.health.set("", SERVING)
        await self.health.set(INFERENCE_SERVICE, SERVING)
        await self.health.set(KSERVE_SERVICE, SERVING)
        self.repository.add_listener(self._sync_health)
        await self._sync_health()
        if not self.repository.names():
            log.warning("no_models", models=str(self.config.models))

    async def _sync_health(self) -> None:
        if self.gate.stopping:
            return  # everything is NOT_SERVING now
        serving = set(self.repository.names())
        known = serving | set(self.repository.states.names())  # loading or failed: NOT_SERVING
        for name in sorted(known | self._model_names):
            await self.health.set(name, SERVING if name in serving else NOT_SERVING)
        self._model_names |= known

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; concurrent calls share one shutdown."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(grace))
        await asyncio.shield(self._stopping)

    def hurry(self) -> None:
        """End a drain now: calls still running are cancelled (a second Ctrl-C)."""
        self._hurry.set()

    async def _drained(self, grace: float) -> bool:
        idle = asyncio.create_task(self.gate.wait_idle(grace))
        hurry = asyncio.create_task(self._hurry.wait())
        await asyncio.wait((idle, hurry), return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        idle.cancel()
        return idle.done() and not idle.cancelled() and idle.result()

    async def _stop(self, grace: float | None) -> None:
        grace = self.config.grace_period_s if grace is None else grace
        log.info("draining", grace_period_s=grace)
        # 1. Stop being chosen: NOT_SERVING to probes and watchers, readiness false;
        # calls are still served until the clients have moved.
        self.gate.stopping = True
        await self.health.enter_graceful_shutdown()
        start = time.monotonic()
        await self._settle(min(grace, SETTLE_MAX_S))
        # 2. GOAWAY now, not at the end: clients move new calls to other addresses while
        # the calls already here run on. (Closing only after the drain cancelled the
        # calls that reached the port between the last in-flight call and the close.)
        # A call that still comes in (HTTP keep-alive) is refused before it runs
        # (UNAVAILABLE, trailers only, or 503 + Connection: close): retryable.
        grace = max(0.0, grace - (time.monotonic() - start))
        closing = asyncio.create_task(self._grpc.stop(grace)) if self._grpc is not None else None
        self.gate.draining = True
        if self.http is not None:
            self.http.stop_accepting()
        # 3. In-flight calls of every front finish.
        drained = await self._drained(grace)
        if not drained:
            log.warning("grace_period_over", cancelled_calls=self.gate.inflight)
        # 4. Watch streams end; anything else still open (a reflection stream, calls past
        # the grace period) is cancelled.
        await self.health.end_watches()
        if closing is not None and self._grpc is not None:
            # grpc's own grace (the same deadline) ends now too: it cancels what is left.
            # A second stop() while the first still runs crashed grpc core (SIGSEGV) with
            # streams in flight; it is called only when grpc does not close by itself.
            if not self._hurry.is_set():
                await asyncio.wait((closing,), timeout=2.0)
            if not closing.done():
                await self._grpc.stop(0)
            await closing
        if self.http is not None:
            await self.http.stop()
        await self.repository.stop(drain=False)
        log.info("stopped")
        self._stopped.set()

    async def _settle(self, within_s: float) -> None:
        """Wait until no call came in for QUIET_S (clients have moved), at most `within_s`."""
        end = time.perf_counter() + within_s
        quiet_since = time.perf_counter()
        while not self._hurry.is_set():
            now = time.perf_counter()
            if now >= end or now - max(quiet_since, self.gate.last_call) >= QUIET_S:
                return
            await asyncio.sleep(0.05)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


@contextlib.asynccontextmanager
async def serve_in_process(config: ServerConfig) -> AsyncIterator[Server]:
    """A started server for the block's duration (stopped with a short grace at exit)."""
    server = Server(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=min(config.grace_period_s, 1.0))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain. Returns the exit code."""
    server = Server(config)
    metrics = None
    if config.metrics_port:
        from headrace.server.metrics import serve_metrics

        tls = server.tls if config.metrics_tls else None
        metrics = serve_metrics(
            config.metrics_port,
            host=config.host,
            authenticator=server.auth,
            ssl_context=tls.ssl_context() if tls is not None else None,
        )
        log.info("metrics", host=config.host, port=config.metrics_port, path="/metrics")
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    stopping: set[asyncio.Task[None]] = set()
    started = False

    def on_signal(signame: str) -> None:
        log.info("signal", signal=signame)
        if not started and main is not None:
            main.cancel()  # still loading models: give up the start
        elif stopping:
            server.hurry()  # a second signal: stop waiting for in-flight calls
        else:
            stopping.add(asyncio.ensure_future(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        try:
            await server.start()
        except asyncio.CancelledError:
            if server._grpc is not None:
                await server._grpc.stop(0)
            if server.http is not None:
                await server.http.stop()
            await server.repository.stop(drain=False)
            log.info("stopped", during="startup")
            return 0
        started = True
        freeze_startup_heap()  # the models loaded: out of every full collection's scan
        await server.wait_stopped()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if metrics is not None:
            metrics.shutdown()
    return 0


def run(config: ServerConfig) -> int:
    """Blocking entry point of `headrace serve` (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return int(uvloop.run(serve(config)))

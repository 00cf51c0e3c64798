"""The HTTP front on uvicorn, on the event loop of the gRPC server (no thread, no process).

    front = HttpFront(repository, config, gate, auth, tls)  # config.http_port, host, max_message_mb
    await front.start()                          # binds; /health/live answers from here
    front.loading = False                        # models loaded: inference routes open
    gate.draining = True                         # the server drains: new inference calls get 503
    await gate.wait_idle(grace)                  # every front's calls, this one's included
    await front.stop()                           # what still runs is cancelled (a 503 to its caller)

The drain flag, the count of running calls, the log line and the error
classification are the server's, shared with the gRPC fronts (server/rpc.py).
So are the door's checks: with an API key file every request but health (as
`auth_exempt` says), `/metrics` (likewise) and the static page needs
`Authorization: Bearer KEY` (BearerAuth, server/http_auth.py: 401 in OpenAI's
shape), a key scoped to some models gets 403 on another and sees only its own in
`/v1/models`; with a certificate the port speaks TLS only, from the same reloading
SSLContext as the metrics port (server/tls.py), client certificates required
with `tls_client_ca`.

uvicorn is driven through its lower-level pieces (startup / main_loop / shutdown)
on a socket bound here, never `uvicorn.run`: its signal handlers would replace
headrace's drain, and its logging config would replace structlog's. The app is
a bare Starlette Router of `Endpoint`s; Starlette was chosen over FastAPI on
measured per-request cost (docs/serving.md, bench/http_frameworks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from importlib import resources

import uvicorn
from headrace.server.auth import Authenticator
from headrace.server.config import ServerConfig
from headrace.server.errors import ServerDraining
from headrace.server.http_api import handlers
from headrace.server.http_api.calls import Endpoint, Handler, not_found
from headrace.server.http_auth import BearerAuth
from headrace.server.logs import get_logger
from headrace.server.repository import ModelRepository
from headrace.server.rpc import Gate
from headrace.server.tls import ServerTls
from starlette.routing import Route, Router

log = get_logger("headrace.http")

SHUTDOWN_WAIT_S = 2  # cancelled requests get this long to send their last bytes


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # --workers: every worker listens on the port (server/workers.py)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror}") from exc
    return sock


class HttpFront:
    """The OpenAI-compatible HTTP API, health, metrics and the chat page on one port."""

    def __init__(
        self,
        repository: ModelRepository,
        config: ServerConfig,
        gate: Gate,
        authenticator: Authenticator | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        self.repository = repository
        self.gate = gate  # the server's: one drain and one count of running calls for every front
        self.host = config.host
        self.requested_port = config.http_port
        self.reuse_port = config.reuse_port
        self.body_limit = config.max_message_mb * 1024 * 1024
        self.loading = True  # until the server's models are loaded
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.page = resources.files(__package__).joinpath("static/index.html").read_bytes()
        self.app: Router | BearerAuth = self._router(serve_metrics=config.metrics_port == 0)
        if authenticator is not None:
            self.app = BearerAuth(self.app, authenticator)
        self.tls = tls
        self._sock: socket.socket | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._main: asyncio.Task[None] | None = None
        self.port = 0

    def _router(self, *, serve_metrics: bool) -> Router:
        h = handlers

        def get(route: str, fn: Handler, inference: bool = True) -> Route:
            return Route(route, Endpoint(self, route, fn, method="GET", inference=inference))

        def post(route: str, fn: Handler) -> Route:
            return Route(route, Endpoint(self, route, fn, method="POST"))

        routes = [
            get("/", h.page, inference=False),
            get("/health/live", h.live, inference=False),
            get("/health/ready", h.ready, inference=False),
            get("/v1/models", h.list_models),
            get("/v1/models/{model:path}", h.get_model),
            post("/v1/completions", h.completions),
            post("/v1/chat/completions", h.chat_completions),
            post("/v1/classify", h.classify),
        ]
        if serve_metrics:
            routes.append(get("/metrics", h.metrics, inference=False))
        return Router(routes, default=not_found)

    # -- requests -------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.gate.draining

    def accepting(self) -> bool:
        return not (self.loading or self.gate.draining)

    def refuse_if_closed(self) -> None:
        """ServerDraining (503) while the models load or the server drains."""
        self.gate.refuse_if_draining()
        if self.loading:
            raise ServerDraining("the server is still loading its models; retry shortly")

    def track(self, task: asyncio.Task[None]) -> None:
        """`task` serves a request: `stop` cancels it if it still runs then."""
        self._tasks.add(task)

    def untrack(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._sock = _bind(self.host, self.requested_port, self.reuse_port)
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,  # structlog's configuration stays in charge
            access_log=False,  # one `event="http"` line per request instead
            http="httptools",
            ws="none",
            proxy_headers=False,  # X-Forwarded-* are not trusted unless a proxy is configured
            server_header=False,
            timeout_graceful_shutdown=SHUTDOWN_WAIT_S,
        )
        config.load()
        if self.tls is not None:
            config.ssl = self.tls.ssl_context()  # follows certificate rotation
        for name in ("uvicorn", "uvicorn.error"):
            logging.getLogger(name).setLevel(logging.WARNING)
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._sock])
        self._uvicorn = server
        self._main = asyncio.create_task(server.main_loop(), name="http-front")
        log.info("http_serving", host=self.host, port=self.port, tls=self.tls is not None)

    async def stop(self) -> None:
        """Cancel what still runs (its caller gets a 503), then close every connection."""
        self.stopping = True
        self.gate.draining = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=SHUTDOWN_WAIT_S)
        server = self._uvicorn
        if server is None:
            if self._sock is not None:
                self._sock.close()
            return
        server.should_exit = True
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        # Our requests are done by now; what is left is idle keep-alive connections. Over TLS
        # a close waits for the peer's close_notify, which an idle client never sends, and
        # uvicorn's shutdown would wait out its timeout for them: end them here.
        for connection in list(server.server_state.connections):
            connection.shutdown()
        await asyncio.sleep(0.05)
        for connection in list(server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        await server.shutdown(sockets=[self._sock] if self._sock else None)
        self._uvicorn = None

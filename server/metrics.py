"""Prometheus metrics, named in the style of Triton's and vLLM's.

Served on their own HTTP port (`headrace serve --metrics-port`), from a thread
of their own: a scrape never waits for the event loop; or at `/metrics` of the
HTTP front's port when no metrics port is set apart. With an API key file
the port wants a key too (unless `auth_exempt` names "metrics"), and with
`metrics_tls` it speaks TLS with the server's certificate. Every metric
lives in one registry (`REGISTRY`) so tests and embedders can read it without
the process-wide default registry.
"""

from __future__ import annotations

import os
import socket
import socketserver
import ssl
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from headrace.server import auth
from headrace.server.logs import get_logger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

log = get_logger("headrace.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)
_TOKEN_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)

REQUESTS = Counter(
    "headrace_requests",
    "Finished calls of every front by method (HTTP: the route), model and gRPC status code.",
    ["rpc", "model", "code"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "headrace_request_duration_seconds",
    "Wall time of a call from arrival to its last message (HTTP: its last byte).",
    ["rpc", "model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "headrace_http_requests",
    "Finished HTTP requests by route, model and HTTP status (499: the client left first).",
    ["route", "model", "status"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "headrace_queue_depth",
    "Requests waiting for a batch (encoder) or a KV slot (decoder).",
    ["model"],
    registry=REGISTRY,
    multiprocess_mode="livesum",  # --workers: the sum over the workers alive
)
BATCH_SIZE = Histogram(
    "headrace_batch_size",
    "Rows per backend call: texts per encoder batch, sequences per decode step.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128),
    registry=REGISTRY,
)
BACKEND_DURATION = Histogram(
    "headrace_backend_duration_seconds",
    "Time of one backend call (encoder forward, prefill or decode step).",
    ["model", "kind"],
    buckets=(*_TOKEN_BUCKETS, 2.0, 5.0),
    registry=REGISTRY,
)
ACTIVE_SLOTS = Gauge(
    "headrace_active_slots",
    "KV-cache slots holding a running sequence.",
    ["model"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
TIME_TO_FIRST_TOKEN = Histogram(
    "headrace_time_to_first_token_seconds",
    "From a generate request's arrival in the engine to its first token.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INTER_TOKEN_LATENCY = Histogram(
    "headrace_inter_token_latency_seconds",
    "Time between consecutive tokens of one sequence.",
    ["model"],
    buckets=_TOKEN_BUCKETS,
    registry=REGISTRY,
)
GENERATED_TOKENS = Counter(
    "headrace_generation_tokens",
    "Tokens generated.",
    ["model"],
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "headrace_prompt_tokens",
    "Tokens read from inputs (texts and prompts, after truncation).",
    ["model"],
    registry=REGISTRY,
)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    timeout = 10  # seconds a connection may stay silent (a stalled TLS handshake too)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _guarded(app: Any, authenticator: auth.Authenticator | None) -> Any:
    """The WSGI app behind the shared API key check: 401 without a valid key."""
    if authenticator is None or authenticator.is_exempt("metrics"):
        return app

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        try:
            authenticator.authenticate(environ.get("HTTP_AUTHORIZATION"))
        except auth.Unauthenticated as exc:
            log.warning("auth_denied", front="metrics", reason=exc.reason, key_id=exc.key_id)
            headers = [("WWW-Authenticate", "Bearer"), ("Content-Type", "text/plain")]
            start_response("401 Unauthorized", headers)
            return [auth.UNAUTHENTICATED_MESSAGE.encode() + b"\n"]
        return app(environ, start_response)

    return guarded


def exposed_registry() -> CollectorRegistry:
    """What /metrics shows: REGISTRY, or with --workers (PROMETHEUS_MULTIPROC_DIR set) the
    samples of every worker, summed (server/workers.py)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    return registry


def serve_metrics(
    port: int,
    host: str = "127.0.0.1",
    *,
    authenticator: auth.Authenticator | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> WSGIServer:
    """Start the /metrics HTTP(S) endpoint in a daemon thread; `shutdown()` stops it."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    app = _guarded(make_wsgi_app(exposed_registry()), authenticator)
    httpd: WSGIServer = make_server(host, port, app, server_class, handler_class=_Quiet)
    if ssl_context is not None:
        # The handshake runs in the connection's own thread, not in the accepting one.
        httpd.socket = ssl_context.wrap_socket(
            httpd.socket, server_side=True, do_handshake_on_connect=False
        )
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd

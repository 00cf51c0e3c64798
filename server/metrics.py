"""Prometheus metrics, named in the style of Triton's and vLLM's.

Served on their own HTTP port (`headrace serve --metrics-port`). Every metric
lives in one registry (`REGISTRY`) so tests and embedders can read it without
the process-wide default registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
    "Finished RPCs by method, model and gRPC status code.",
    ["rpc", "model", "code"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "headrace_request_duration_seconds",
    "Wall time of an RPC from arrival to its last message.",
    ["rpc", "model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "headrace_queue_depth",
    "Requests waiting for a batch (encoder) or a KV slot (decoder).",
    ["model"],
    registry=REGISTRY,
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


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Start the /metrics HTTP endpoint in a daemon thread."""
    start_http_server(port, addr=host, registry=REGISTRY)

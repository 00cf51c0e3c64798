"""The gRPC transport's own limits, set so that none fires before the server's admission.

Past what a model's queue and slots take, a call must end RESOURCE_EXHAUSTED from our
code, with a retry hint (server/rpc.py), never be dropped by the transport. What grpc
core does by default, and what we set instead:

    grpc.server.max_pending_requests(_hard_limit)   calls the application has not yet
        picked up (grpc.aio picks them up one at a time on the event loop): core
        defaults 1,000 / 3,000, past which it cancels new calls at random (CANCELLED,
        never seen by a handler). A burst of 3,000 calls on one channel crossed it.
    grpc.server_max_unrequested_time_in_server      how long such a call may wait (30 s)
    grpc.max_concurrent_streams                     per connection: unlimited; bounded
        here, so a client queues calls on its side instead of flooding one connection
    keepalive policy                                the SDK pings every `keepalive_time`
        with `max_pings_without_data=0`; core's default policy (5 min between pings,
        2 strikes) answers that with GOAWAY "too_many_pings", ending every call on the
        connection. We allow a ping every 10 s, and ping idle clients ourselves.
    grpc.max_connection_age_ms (when configured)    for L4 load balancers: connections
        are closed after about this long so that clients spread over new replicas; its
        grace lets running calls (streams too) finish first.

`maximum_concurrent_rpcs` of grpc.aio.server stays unset: it would answer
RESOURCE_EXHAUSTED without a retry hint, before any model's queue is full.
"""

from __future__ import annotations

from typing import Any

PENDING_CALLS = 1 << 20  # calls accepted by the transport, not yet by a handler
MAX_STREAMS_PER_CONNECTION = 16384
MIN_CLIENT_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_MS = 60_000  # ping a silent client after this long
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000


def server_options(
    max_message_bytes: int,
    *,
    max_connection_age_s: float = 0.0,
    grace_period_s: float = 10.0,
    reuse_port: bool = False,
) -> list[tuple[str, Any]]:
    """The channel arguments of grpc.aio.server."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # off unless asked (--workers): a second server on a taken port fails to start
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
        ("grpc.server_max_unrequested_time_in_server", 3600),  # seconds
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        # the keepalive enforcement policy: what a client may send
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),  # 0: never GOAWAY a client for its pings
        ("grpc.keepalive_permit_without_calls", 1),
        # our own pings, to find dead peers
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
    ]
    if max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            # running calls get the drain's grace period before the connection closes
            ("grpc.max_connection_age_grace_ms", int(max(grace_period_s, 1.0) * 1000)),
        ]
    return options

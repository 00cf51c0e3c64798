"""Channel settings shared by Client and AsyncClient: target, TLS, retries, balancing."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc

__all__ = ["Metadata", "RetryPolicy"]

SERVICE = "headrace.v1.Inference"
# Retried by the channel. gRPC retries an attempt only while the server has sent no
# response headers, and a headrace server sends them with the first response (a generation
# stream: once its request is queued): a retried
# attempt was refused before it ran (full queue, drain, model loading) or its answer never
# reached the caller. Nothing here changes server state, so a second attempt is as good
# as the first; a seeded Generate gives the same text, an unseeded one another sample the
# caller could not tell apart. A stream that has delivered text is never retried.
# ClassifyStream (requests streamed by the caller) is not retried.
RETRIED_METHODS = ("Classify", "ListModels", "Generate", "GenerateStream")

# Per-call metadata: a mapping or (key, value) pairs; keys are lower case ASCII,
# values str (or bytes for keys ending in "-bin").
Metadata = Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]]
PemSource = bytes | str | Path


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """gRPC's own retry policy (service config `retryPolicy`) for the calls of
    RETRIED_METHODS (every call but ClassifyStream).

    gRPC retries an attempt only before the server has sent response headers, with
    exponential backoff and jitter, within the call's deadline. `max_attempts` counts the
    first attempt; gRPC caps it at 5. UNAVAILABLE (draining, not reachable) usually
    lands on another replica. RESOURCE_EXHAUSTED (a full queue) waits the server's hint
    (`grpc-retry-pushback-ms`, which replaces the backoff for that attempt) before the
    next attempt. Retry throttling (gRPC's token bucket) keeps retries from piling onto an
    overloaded server: each failed attempt takes a token, each success returns
    `throttle_token_ratio`, and retries pause while fewer than half of
    `throttle_max_tokens` are left.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.1  # seconds
    max_backoff: float = 2.0  # seconds
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[grpc.StatusCode, ...] = (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    throttle_max_tokens: int = 100
    throttle_token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError("max_attempts must be in [2, 5] (gRPC caps it at 5)")
        if self.initial_backoff <= 0 or self.max_backoff <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("backoffs and multiplier must be > 0")
        if not self.retryable_codes:
            raise ValueError("retryable_codes must name at least one status code")


def service_config(
    retry: RetryPolicy | None, load_balancing: Literal["round_robin", "pick_first"]
) -> str:
    """The JSON service config of the channel (balancing policy and retry policy).

    With round_robin the channel also watches each address's grpc.health.v1 status of
    the Inference service (gRPC's client-side health checking): an address whose server
    has begun to drain (NOT_SERVING) gets no new call, before its connection closes, so
    a rolling restart's calls go to the other addresses. A server without the health
    service (UNIMPLEMENTED) counts as healthy."""
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if load_balancing == "round_robin":
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    if retry is not None:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE, "method": m} for m in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": retry.max_attempts,
                    "initialBackoff": _duration(retry.initial_backoff),
                    "maxBackoff": _duration(retry.max_backoff),
                    "backoffMultiplier": retry.backoff_multiplier,
                    "retryableStatusCodes": [code.name for code in retry.retryable_codes],
                },
            }
        ]
        config["retryThrottling"] = {
            "maxTokens": retry.throttle_max_tokens,
            "tokenRatio": retry.throttle_token_ratio,
        }
    return json.dumps(config)


def _duration(seconds: float) -> str:
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def normalize_target(target: str | Sequence[str]) -> str:
    """A gRPC target string.

    "host:port" and URIs ("dns:///name:port", "unix:///path", "ipv4:...") pass through.
    A list of IP "address:port" entries becomes gRPC's multi-address form
    "ipv4:a:p,b:p" (or "ipv6:[a]:p,..."), balanced across by the channel's policy.
    """
    if isinstance(target, str):
        if not target:
            raise ValueError("target must not be empty")
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("target list must not be empty")
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    parts = []
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{address!r}: list targets must be 'ip:port'")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{address!r}: list targets take IP addresses; "
                "use 'dns:///name:port' to balance over the addresses of a name"
            ) from None
        families.add(ip.version)
        parts.append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if len(families) > 1:
        raise ValueError("list targets must be all IPv4 or all IPv6")
    scheme = "ipv4" if families == {4} else "ipv6"
    return f"{scheme}:{','.join(parts)}"


def _pem(source: PemSource | None) -> bytes | None:
    # bytes are PEM content; str and Path name a file.
    if source is None:
        return None
    if isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def credentials(
    tls: bool | grpc.ChannelCredentials,
    root_certificates: PemSource | None,
    client_cert: PemSource | None,
    client_key: PemSource | None,
) -> grpc.ChannelCredentials | None:
    """Channel credentials, or None for a plaintext channel."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together")
    if isinstance(tls, grpc.ChannelCredentials):
        if root_certificates is not None or client_cert is not None:
            raise ValueError("pass either ChannelCredentials or certificate files, not both")
        return tls
    if not tls:
        if root_certificates is not None or client_cert is not None:
            raise ValueError("certificates given but tls=False")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates),
        private_key=_pem(client_key),
        certificate_chain=_pem(client_cert),
    )


def channel_options(
    *,
    retry: RetryPolicy | None,
    load_balancing: Literal["round_robin", "pick_first"],
    keepalive_time: float | None,
    keepalive_timeout: float,
    keepalive_permit_without_calls: bool,
    max_message_bytes: int | None,
    server_name_override: str | None,
    user_agent: str | None,
    extra: Sequence[tuple[str, Any]],
) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(retry, load_balancing)),
        ("grpc.enable_retries", 1 if retry is not None else 0),
        # Our service config wins over one a DNS TXT record might carry.
        ("grpc.service_config_disable_resolution", 1),
    ]
    if keepalive_time is not None:
        # The server must allow pings this often, or it closes the connection
        # (GOAWAY "too_many_pings"): match its keepalive policy.
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", int(keepalive_permit_without_calls)),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    if max_message_bytes is not None:
        options += [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    if server_name_override is not None:
        options.append(("grpc.ssl_target_name_override", server_name_override))
    if user_agent is not None:
        options.append(("grpc.primary_user_agent", user_agent))
    options.extend(extra)
    return options


def merge_metadata(
    base: tuple[tuple[str, str | bytes], ...], extra: Metadata | None
) -> tuple[tuple[str, str | bytes], ...] | None:
    """Client-wide metadata followed by the call's own."""
    if extra is None:
        return base or None
    pairs = extra.items() if isinstance(extra, Mapping) else extra
    merged = base + tuple((key.lower(), value) for key, value in pairs)
    return merged or None


def as_pairs(metadata: Metadata | None) -> tuple[tuple[str, str | bytes], ...]:
    return merge_metadata((), metadata) or ()


def with_api_key(
    pairs: tuple[tuple[str, str | bytes], ...], api_key: str | None
) -> tuple[tuple[str, str | bytes], ...]:
    """The client's metadata with `authorization: Bearer <api_key>` in front."""
    if api_key is None:
        return pairs
    if not api_key or not api_key.isascii() or not api_key.isprintable() or " " in api_key:
        raise ValueError("api_key must be printable ASCII without spaces")
    if any(key == "authorization" for key, _ in pairs):
        raise ValueError("pass api_key or an authorization metadata entry, not both")
    return (("authorization", f"Bearer {api_key}"), *pairs)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a client needs to open its channel and make calls."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    compression: grpc.Compression | None
    metadata: tuple[tuple[str, str | bytes], ...] = field(repr=False)  # may hold the API key
    timeout: float | None
    wait_for_ready: bool | None

    def call_timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def call_metadata(
        self, metadata: Metadata | None
    ) -> tuple[tuple[str, str | bytes], ...] | None:
        return merge_metadata(self.metadata, metadata)


def settings(
    target: str | Sequence[str],
    *,
    tls: bool | grpc.ChannelCredentials,
    root_certificates: PemSource | None,
    client_cert: PemSource | None,
    client_key: PemSource | None,
    server_name_override: str | None,
    metadata: Metadata | None,
    api_key: str | None,
    timeout: float | None,
    retry: RetryPolicy | None,
    load_balancing: Literal["round_robin", "pick_first"],
    keepalive_time: float | None,
    keepalive_timeout: float,
    keepalive_permit_without_calls: bool,
    max_message_bytes: int | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
    user_agent: str | None,
    options: Sequence[tuple[str, Any]],
) -> Settings:
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be > 0 seconds (or None for no deadline)")
    return Settings(
        target=normalize_target(target),
        credentials=credentials(tls, root_certificates, client_cert, client_key),
        options=tuple(
            channel_options(
                retry=retry,
                load_balancing=load_balancing,
                keepalive_time=keepalive_time,
                keepalive_timeout=keepalive_timeout,
                keepalive_permit_without_calls=keepalive_permit_without_calls,
                max_message_bytes=max_message_bytes,
                server_name_override=server_name_override,
                user_agent=user_agent,
                extra=options,
            )
        ),
        compression=compression,
        metadata=with_api_key(as_pairs(metadata), api_key),
        timeout=timeout,
        wait_for_ready=wait_for_ready,
    )

"""What Client and AsyncClient share: the constructor, the settings, the RPC table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypeVar

import grpc
from headrace.v1 import inference_pb2_grpc

from . import _health
from ._calls import Call, Method, Streaming
from ._channel import Metadata, PemSource, RetryPolicy, Settings, settings
from ._streams import RequestFeeder
from ._tracing import with_trace_context

__all__ = ["DEFAULT_TARGET", "ClientBase"]

DEFAULT_TARGET = "localhost:50051"

# grpc.Channel for Client, grpc.aio.Channel for AsyncClient
ChannelT = TypeVar("ChannelT", grpc.Channel, grpc.aio.Channel)


class ClientBase(Generic[ChannelT]):
    """The part of a client that does not depend on how calls are sent."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        tls: bool | grpc.ChannelCredentials = False,
        root_certificates: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        server_name_override: str | None = None,
        metadata: Metadata | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        load_balancing: Literal["round_robin", "pick_first"] = "round_robin",
        keepalive_time: float | None = None,
        keepalive_timeout: float = 20.0,
        keepalive_permit_without_calls: bool = False,
        max_message_bytes: int | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
        user_agent: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        channel: ChannelT | None = None,
    ) -> None:
        """Open a channel to a headrace server (or use `channel`).

        Args:
            target: "host:port", a gRPC URI ("dns:///name:port", "unix:///path"), or a
                list of "ip:port" addresses balanced across.
            tls: False for plaintext, True for TLS with the system roots (or
                `root_certificates`), or ready `grpc.ChannelCredentials`.
            root_certificates, client_cert, client_key: PEM bytes, or paths to PEM files
                (client_cert + client_key for mutual TLS).
            server_name_override: the name to check the server certificate against
                (tests, or when connecting by IP address).
            metadata: sent with every call (e.g. `{"x-request-id": ...}`).
            api_key: sent with every call as `authorization: Bearer <api_key>` (a server
                started with `--api-key-file`). Use TLS where the network is not private:
                the key is a password.
            timeout: default deadline of each call in seconds; None means no deadline.
            retry: retry policy for Classify and ListModels; None disables retries.
            load_balancing: "round_robin" (spread calls over every resolved address) or
                "pick_first".
            keepalive_time: seconds between HTTP/2 keepalive pings; None disables them.
                The server's keepalive policy must allow this rate.
            keepalive_timeout: seconds to wait for a ping's answer before closing.
            keepalive_permit_without_calls: ping while no call is open too.
            max_message_bytes: largest message sent or received (gRPC default: 4 MiB in).
            wait_for_ready: queue calls while the channel connects instead of failing
                fast.
            compression: the channel's compression (e.g. `grpc.Compression.Gzip`).
            user_agent: prepended to gRPC's own user agent.
            options: extra raw gRPC channel options, appended last.
            channel: an open channel to use instead of making one (closing the client
                leaves it open).
        """
        self._settings: Settings = settings(
            target,
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            server_name_override=server_name_override,
            metadata=metadata,
            api_key=api_key,
            timeout=timeout,
            retry=retry,
            load_balancing=load_balancing,
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            keepalive_permit_without_calls=keepalive_permit_without_calls,
            max_message_bytes=max_message_bytes,
            wait_for_ready=wait_for_ready,
            compression=compression,
            user_agent=user_agent,
            options=options,
        )
        self._owns_channel = channel is None
        self._channel: ChannelT = self._connect(self._settings) if channel is None else channel
        self._rpcs = _rpcs(self._channel)

    def _connect(self, s: Settings) -> ChannelT:
        """A new channel to `s.target` (plaintext, or TLS with `s.credentials`)."""
        raise NotImplementedError

    @property
    def target(self) -> str:
        """The gRPC target string the channel was made for."""
        return self._settings.target

    def _call_options(self, call: Call[Any]) -> dict[str, Any]:
        """Deadline, metadata and wait-for-ready of one call, the client's defaults filled in."""
        s = self._settings
        return {
            "timeout": s.call_timeout(call.timeout),
            "metadata": with_trace_context(s.call_metadata(call.metadata)),
            "wait_for_ready": s.wait_for_ready,
        }

    def _start_stream(
        self, call: Streaming[Any], aio: bool
    ) -> tuple[Any, Callable[[], BaseException | None] | None]:
        """Start a streaming call: the gRPC call, and where the requests' own error is kept.

        A ClassifyStream's requests are read from its RequestFeeder: as an iterator by
        the sync channel's thread, as an async iterator on grpc.aio's loop.
        """
        request: Any = call.request
        request_error = None
        if isinstance(request, RequestFeeder):
            request_error = request.error
            request = request.__aiter__() if aio else iter(request)
        return self._rpcs[call.method](request, **self._call_options(call)), request_error

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r})"


def _rpcs(channel: grpc.Channel | grpc.aio.Channel) -> dict[Method, Any]:
    """The multi-callable of each method, made once per channel."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    return {
        "Classify": stub.Classify,
        "ClassifyStream": stub.ClassifyStream,
        "Generate": stub.Generate,
        "GenerateStream": stub.GenerateStream,
        "ListModels": stub.ListModels,
        # bytes in, bytes out: the Check request is serialized by _calls.health, and
        # its response read by _health.check_response
        "Check": channel.unary_unary(
            _health.CHECK_METHOD, request_serializer=None, response_deserializer=None
        ),
    }

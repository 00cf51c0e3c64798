"""The synchronous client."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Literal, Self

import grpc
from headrace.v1 import inference_pb2_grpc

from . import _convert, _health
from ._channel import Metadata, PemSource, RetryPolicy, Settings, settings
from ._errors import Unavailable, error_from_rpc_error
from ._streams import RequestFeeder, ResponseStream
from ._types import (
    ClassifyInput,
    ClassifyResult,
    GenerateChunk,
    GenerateResult,
    HealthStatus,
    ModelInfo,
    Task,
)

__all__ = ["Client"]

DEFAULT_TARGET = "localhost:50051"


class Client:
    """A blocking client of a headrace server; safe to share between threads.

    Args:
        target: "host:port", a gRPC URI ("dns:///name:port", "unix:///path"), or a list
            of "ip:port" addresses balanced across.
        tls: False for plaintext, True for TLS with the system roots (or
            `root_certificates`), or ready `grpc.ChannelCredentials`.
        root_certificates, client_cert, client_key: PEM bytes, or paths to PEM files
            (client_cert + client_key for mutual TLS).
        server_name_override: the name to check the server certificate against (tests,
            or when connecting by IP address).
        metadata: sent with every call (e.g. `{"authorization": "Bearer ..."}`).
        timeout: default deadline of each call in seconds; None means no deadline.
        retry: retry policy for Classify and ListModels; None disables retries.
        load_balancing: "round_robin" (spread calls over every resolved address) or
            "pick_first".
        keepalive_time: seconds between HTTP/2 keepalive pings; None disables them.
            The server's keepalive policy must allow this rate.
        max_message_bytes: largest message sent or received (gRPC default: 4 MiB in).
        wait_for_ready: queue calls while the channel connects instead of failing fast.
        options: extra raw gRPC channel options, appended last.
        channel: an open channel to use instead of making one (`close()` leaves it open).
    """

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
        channel: grpc.Channel | None = None,
    ) -> None:
        self._settings: Settings = settings(
            target,
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            server_name_override=server_name_override,
            metadata=metadata,
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
        s = self._settings
        self._owns_channel = channel is None
        if channel is not None:
            self._channel = channel
        elif s.credentials is None:
            self._channel = grpc.insecure_channel(s.target, s.options, s.compression)
        else:
            self._channel = grpc.secure_channel(s.target, s.credentials, s.options, s.compression)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._health = self._channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.check_request,
            response_deserializer=_health.check_response,
        )

    @property
    def target(self) -> str:
        """The gRPC target string the channel was made for."""
        return self._settings.target

    # -- unary calls ---------------------------------------------------------------

    def classify(
        self,
        texts: str | Sequence[str],
        *,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        request_id: str | None = None,
        reject_overlong: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ClassifyResult:
        """Labels and scores for each text (a bare string is one text), best first.

        `model=""` is the server's default classifier; `version=""` its newest version;
        `top_k=0` returns every label. Retried on UNAVAILABLE by the retry policy.
        """
        request = _convert.classify_request(
            texts,
            model=model,
            version=version,
            top_k=top_k,
            request_id=request_id,
            reject_overlong=reject_overlong,
        )
        response = self._unary(self._stub.Classify, request, timeout, metadata, request_id)
        return _convert.classify_result(response)

    def generate(
        self,
        prompt: str,
        *,
        model: str = "",
        version: str = "",
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        stop: str | Sequence[str] = (),
        request_id: str | None = None,
        reject_overlong: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> GenerateResult:
        """The whole completion of `prompt` (greedy unless `temperature` > 0).

        `max_new_tokens=0` is the model's default; `seed` makes sampling repeatable;
        `ignore_eos` generates past the end-of-sequence token (fixed-length load tests).
        """
        request = _convert.generate_request(
            prompt,
            model=model,
            version=version,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            ignore_eos=ignore_eos,
            stop=stop,
            request_id=request_id,
            reject_overlong=reject_overlong,
        )
        response = self._unary(self._stub.Generate, request, timeout, metadata, request_id)
        return _convert.generate_result(response)

    def models(
        self,
        task: Task | str | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[ModelInfo]:
        """The served models (all, or those of `task`: "classify" or "generate")."""
        request = _convert.list_models_request(task)
        response = self._unary(self._stub.ListModels, request, timeout, metadata, None)
        return _convert.model_infos(response)

    def health(
        self,
        service: str = "",
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> HealthStatus:
        """The serving status from grpc.health.v1 (`service=""`: the whole server).

        Raises NotFound for a service name the server does not know.
        """
        status: HealthStatus = self._unary(self._health, service, timeout, metadata, None)
        return status

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel is connected; raises Unavailable after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(
                grpc.StatusCode.UNAVAILABLE, f"not connected to {self.target} in {timeout}s"
            ) from None

    # -- streaming calls -----------------------------------------------------------

    def stream(
        self,
        prompt: str,
        *,
        model: str = "",
        version: str = "",
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        stop: str | Sequence[str] = (),
        request_id: str | None = None,
        reject_overlong: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ResponseStream[GenerateChunk]:
        """The completion chunk by chunk, as it is produced.

        Breaking out of the loop (and dropping the stream), `close()`, or leaving a
        `with` block cancels the call, which stops generation on the server.
        """
        request = _convert.generate_request(
            prompt,
            model=model,
            version=version,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            ignore_eos=ignore_eos,
            stop=stop,
            request_id=request_id,
            reject_overlong=reject_overlong,
        )
        s = self._settings
        call = self._stub.GenerateStream(
            request,
            timeout=s.call_timeout(timeout),
            metadata=s.call_metadata(metadata),
            wait_for_ready=s.wait_for_ready,
        )
        return ResponseStream(call, _convert.generate_chunk, request_id)

    def classify_stream(
        self,
        requests: Iterable[ClassifyInput | str | Sequence[str]],
        *,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        reject_overlong: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ResponseStream[ClassifyResult]:
        """One ClassifyResult per request, in order, over one bidirectional call.

        Each request is a `ClassifyInput`, a text, or a list of texts; the keyword
        arguments fill what an item leaves unset. `requests` is read lazily from a
        gRPC thread, so it may be a generator that waits for work. An error on one
        request ends the stream.
        """
        feeder = RequestFeeder(requests, model, version, top_k, reject_overlong)
        s = self._settings
        call = self._stub.ClassifyStream(
            iter(feeder),
            timeout=s.call_timeout(timeout),
            metadata=s.call_metadata(metadata),
            wait_for_ready=s.wait_for_ready,
        )
        return ResponseStream(call, _convert.classify_result, None, feeder.error)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close the channel (unless it was given); calls in flight are cancelled."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(target={self.target!r})"

    def _unary(
        self,
        method: Any,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        request_id: str | None,
    ) -> Any:
        s = self._settings
        try:
            return method(
                request,
                timeout=s.call_timeout(timeout),
                metadata=s.call_metadata(metadata),
                wait_for_ready=s.wait_for_ready,
            )
        except grpc.RpcError as err:
            raise error_from_rpc_error(err, request_id) from err

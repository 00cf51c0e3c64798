"""The public surface: both clients offer the same calls, and the generated code's names."""

from __future__ import annotations

import inspect

import headrace.client
import pytest
from headrace.client import AsyncClient, Client

CALLS = ("classify", "generate", "stream", "classify_stream", "models", "health", "wait_ready")


@pytest.mark.parametrize("name", CALLS)
def test_both_clients_take_the_same_arguments(name: str) -> None:
    sync, aio = getattr(Client, name), getattr(AsyncClient, name)
    assert inspect.signature(sync).parameters.keys() == inspect.signature(aio).parameters.keys()
    assert sync.__doc__ and sync.__doc__.split("\n")[0]
    assert sync.__qualname__ == f"Client.{name}" and aio.__qualname__ == f"AsyncClient.{name}"
    # unary calls are coroutines on AsyncClient; streams are async iterators, made at once
    assert inspect.iscoroutinefunction(aio) is (name not in ("stream", "classify_stream"))
    assert not inspect.iscoroutinefunction(sync)


def test_stream_takes_what_generate_takes() -> None:
    generate, stream = inspect.signature(Client.generate), inspect.signature(Client.stream)
    assert generate.parameters == stream.parameters
    assert Client.stream.__doc__ != Client.generate.__doc__


def test_generated_code_has_one_home() -> None:
    import headrace.client.v1.inference_pb2 as old_pb  # the former name stays an alias
    from headrace.client.v1 import inference_pb2_grpc as old_grpc
    from headrace.v1 import inference_pb2, inference_pb2_grpc

    assert old_pb is inference_pb2 and old_grpc is inference_pb2_grpc
    assert inference_pb2.DESCRIPTOR.package == "headrace.v1"
    assert "v1" not in headrace.client.__all__

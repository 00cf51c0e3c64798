"""Real servers on real localhost sockets for end-to-end tests.

    def test_x(server):                       # in-process server over `tiny_models`
        channel = grpc.insecure_channel(server.address)

    def test_y(start_server, model_repo):     # a private server over a private repository
        running = start_server(model_repo, poll_interval_s=0.2)

The server runs on its own event loop in a background thread, so tests use
grpc's plain synchronous API; `running.call(coro_fn)` runs a coroutine
function on the server's loop (e.g. to read a model's slot count).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from headrace.server.app import Server
from headrace.server.config import ServerConfig
from headrace.server.logs import configure_logging
from headrace.server.manifest import MANIFEST_NAME


class RunningServer:
    """A started headrace Server on a private event loop thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        configure_logging(config.log_format, config.log_level)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: Server = self.call(self._start)
        self.port = self.server.port
        self.address = f"127.0.0.1:{self.port}"
        http = self.server.http
        self.http_url = f"http://127.0.0.1:{http.port}" if http is not None else ""

    async def _start(self) -> Server:
        server = Server(self.config)
        await server.start()
        return server

    def call(self, fn: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 60) -> Any:
        """Run `fn()` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def submit(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Start `fn()` on the server's loop; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop)

    def model(self, name: str, version: str | None = None) -> Any:
        versions = self.server.repository._served[name]
        return versions[version or max(versions, key=int)].model

    def stop(self, grace: float = 1.0) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(lambda: self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(url: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample of the Prometheus text at `url` (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return None


def make_config(models: Path, **overrides: Any) -> ServerConfig:
    settings: dict[str, Any] = {"models": models, "port": 0, "poll_interval_s": 0.0}
    settings["log_level"] = "warning"  # rpc lines are checked in test_cli.py
    settings.update(overrides)
    return ServerConfig(**settings).validate()


@pytest.fixture(scope="module")
def server(tiny_models: Path) -> Iterator[RunningServer]:
    """An in-process server over `tiny_models` (read-only), shared by a module's tests."""
    running = RunningServer(make_config(tiny_models))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http_server(long_models: Path) -> Iterator[RunningServer]:
    """An in-process server with the HTTP front over `long_models`, shared by a module."""
    running = RunningServer(make_config(long_models, http_port=free_port()))
    yield running
    running.stop()


@pytest.fixture()
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """Factory: start_server(models_dir, **ServerConfig fields) -> RunningServer, stopped at exit."""
    started: list[RunningServer] = []

    def start(models: Path, **overrides: Any) -> RunningServer:
        running = RunningServer(make_config(models, **overrides))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def add_variant(repo: Path, source: str, name: str, **changes: Any) -> Path:
    """Copy `source`/1 to `name`/1 in `repo`, with manifest sections updated by `changes`.

    add_variant(repo, "tiny-generator", "busy", batching={"max_batch": 1, "max_queue": 0})
    """
    dest = repo / name / "1"
    shutil.copytree(repo / source / "1", dest)
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    for section, values in changes.items():
        manifest[section] = {**manifest.get(section, {}), **values}
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="session")
def long_models(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Path:
    """tiny-classifier plus `long-generator`: a tiny LM with room for 400 new tokens,
    so a stream is still running when a test cancels it or stops the server."""
    from headrace.build.tiny import make_tiny_generator

    root = tmp_path_factory.mktemp("long-models")
    shutil.copytree(tiny_models / "tiny-classifier", root / "tiny-classifier")
    make_tiny_generator(root / "long-generator" / "1", max_context=512)
    path = root / "long-generator" / "1" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["limits"].update(max_input_tokens=64, max_new_tokens=400)
    path.write_text(json.dumps(manifest))
    return root


def bad_request_field(err: grpc.RpcError) -> str | None:
    """The BadRequest field named in an error's `grpc-status-details-bin` trailer."""
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    return bad.field_violations[0].field
    return None


@pytest.fixture()
def field_of() -> Callable[[grpc.RpcError], str | None]:
    return bad_request_field

"""The health probe of the Docker image and the systemd unit, against a real server process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from headrace.edge.healthcheck import check


@pytest.fixture(scope="module")
def edge_server(onnx_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port_file = tmp_path_factory.mktemp("hc") / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "headrace.server", "serve", "--models", str(onnx_models),
         "--profile", "edge", "--port", "0", "--port-file", str(port_file),
         "--intra-op-threads", "1", "--poll-interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert port_file.exists(), f"server did not start (exit {proc.poll()})"
    yield f"127.0.0.1:{int(port_file.read_text())}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serving_server_and_model(edge_server: str) -> None:
    assert check(edge_server) == (True, "SERVING")
    assert check(edge_server, "tiny-generator") == (True, "SERVING")
    assert check(edge_server, "headrace.v1.Inference") == (True, "SERVING")


def test_unknown_service_and_no_server(edge_server: str) -> None:
    ok, why = check(edge_server, "no-such-model")
    assert not ok and why.startswith("NOT_FOUND")
    ok, why = check(f"127.0.0.1:{_free_port()}", timeout=0.5)
    assert not ok and why.startswith(("DEADLINE_EXCEEDED", "UNAVAILABLE"))


def test_exit_codes(edge_server: str) -> None:
    probe = [sys.executable, "-m", "headrace.edge.healthcheck", "--target", edge_server]
    assert subprocess.run(probe, timeout=30).returncode == 0
    failed = subprocess.run(
        [*probe, "--service", "no-such-model"], capture_output=True, text=True, timeout=30
    )
    assert failed.returncode == 1 and "no-such-model: NOT_FOUND" in failed.stderr

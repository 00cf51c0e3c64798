"""A rolling restart loses nothing: two real server processes behind the SDK's round_robin.

Eight callers run Classify through one Client holding both addresses while a
ClassifyStream stays open on replica A, as a long call would during a restart. A
gets SIGTERM mid-load: it must stop being chosen at once (health NOT_SERVING, which the
SDK's round_robin watches, then a GOAWAY), finish the stream, end health Watch streams
cleanly and exit 0, while every unary call succeeds on A before the signal or on B
after it.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headrace.client import Client, HeadraceError
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

CALLERS = 8
MODEL = "tiny-classifier"


def _serve(models: Path, port_file: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "headrace.server", "serve", "--models", str(models),
        "--port", "0", "--port-file", str(port_file), "--profile", "cpu",
        "--backend", "onnxruntime", "--poll-interval", "0", "--grace-period", "8",
        "--intra-op-threads", "1", "--log-level", "info",
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out)


def _port(port_file: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        assert proc.poll() is None, "server exited during start"
        time.sleep(0.05)
    raise AssertionError("server did not write its port")


@pytest.fixture()
def replicas(
    onnx_models: Path, tmp_path: Path
) -> Iterator[list[tuple[subprocess.Popen[bytes], int, Path]]]:
    models = tmp_path / "models"
    shutil.copytree(onnx_models / MODEL, models / MODEL)
    procs = []
    for name in ("a", "b"):
        log = tmp_path / f"{name}.log"
        procs.append(
            (_serve(models, tmp_path / f"{name}.port", log), tmp_path / f"{name}.port", log)
        )
    try:
        yield [(proc, _port(port_file, proc), log) for proc, port_file, log in procs]
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.timeout(90)
def test_sigterm_to_one_replica_under_load_fails_no_call(replicas) -> None:
    (a, port_a, log_a), (b, port_b, _) = replicas
    addresses = [f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"]
    stop = threading.Event()
    ok = [0] * CALLERS
    failures: queue.Queue[str] = queue.Queue()
    with Client(addresses, load_balancing="round_robin", timeout=10) as client:
        client.wait_ready(timeout=30)
        for _ in range(4):
            client.classify("warm up")

        def caller(i: int) -> None:
            while not stop.is_set():
                try:
                    client.classify(f"caller {i} says hello")
                    ok[i] += 1
                except HeadraceError as exc:
                    failures.put(f"{type(exc).__name__}: {exc}")

        # a long call in flight on A: a stream A must finish after the signal
        requests: queue.Queue[pb.ClassifyRequest | None] = queue.Queue()
        with grpc.insecure_channel(addresses[0]) as channel:
            stream = pb_grpc.InferenceStub(channel).ClassifyStream(iter(requests.get, None))
            requests.put(pb.ClassifyRequest(model=MODEL, texts=["first"]))
            assert next(stream).results
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="")
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
            for t in threads:
                t.start()
            time.sleep(1.5)
            before = sum(ok)
            os.kill(a.pid, signal.SIGTERM)
            time.sleep(1.5)  # A drains while its stream is open; the callers keep going
            requests.put(pb.ClassifyRequest(model=MODEL, texts=["after the signal"]))
            assert next(stream).results  # the stream in flight still answers
            requests.put(None)
            assert list(stream) == []
            assert a.wait(15) == 0
            # the watcher heard NOT_SERVING, then its stream ended cleanly (not cancelled)
            assert [r.status for r in watch] == [health_pb2.HealthCheckResponse.NOT_SERVING]
            assert watch.code() == grpc.StatusCode.OK
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(15)
    lost = list(failures.queue)
    assert not lost, f"{len(lost)} of {sum(ok) + len(lost)} calls failed, e.g. {lost[:5]}"
    assert before > 0 and sum(ok) > before  # calls ran before and after the signal
    served_by_a = log_a.read_text().count('"rpc":"Classify"')
    assert served_by_a > 0  # A took its share before the signal
    assert b.poll() is None


def test_a_call_refused_by_a_draining_replica_is_retried_on_the_other(
    start_server, onnx_models: Path, tmp_path: Path
) -> None:
    """The SDK's retry policy with round_robin: a call that a replica refused before it
    ran (UNAVAILABLE, trailers only) goes to the other address, and the caller sees OK.
    Replica A is made to refuse while its health still says SERVING, so round_robin keeps
    choosing it: every call A refuses must come back OK from B."""
    models = tmp_path / "models"
    shutil.copytree(onnx_models / MODEL, models / MODEL)
    a = start_server(models, profile="cpu", backend="onnxruntime")
    b = start_server(models, profile="cpu", backend="onnxruntime")
    with Client([a.address, b.address], load_balancing="round_robin", timeout=10) as client:
        client.wait_ready(timeout=30)
        a.server.gate.draining = True  # refuses every call with UNAVAILABLE before it runs
        refusing_since = time.perf_counter()
        try:
            results = [client.classify(f"text {i}") for i in range(40)]
        finally:
            a.server.gate.draining = False
    assert len(results) == 40 and all(r.results for r in results)
    # A was chosen (and refused) after it began to refuse: those calls were retried on B
    assert a.server.gate.last_call > refusing_since

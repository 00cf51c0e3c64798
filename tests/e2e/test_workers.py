"""`headrace serve --workers 2`: two front-end processes on one port under a supervisor, in
real processes over real sockets: every RPC, the spread over both pids, cancellation,
one metrics view, a killed worker replaced without a lost call, the drain on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headrace.client import Client, RetryPolicy
from headrace.server.kserve.pb import grpc_service_pb2 as kpb
from headrace.server.kserve.pb import grpc_service_pb2_grpc as kgrpc
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.e2e.conftest import free_port, scrape

GEN = "long-generator"
START_TIMEOUT_S = 180


class Workers:
    """`headrace serve --workers 2` in a process of its own; its JSON log lines collected."""

    def __init__(self, models: Path, tmp: Path, *extra: str) -> None:
        self.port_file = tmp / "port"
        self.http_port = free_port()
        self.metrics_port = free_port()
        cmd = [
            sys.executable, "-m", "headrace.server", "serve", "--models", str(models),
            "--workers", "2", "--port", "0", "--port-file", str(self.port_file),
            "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port),
            "--poll-interval", "0", "--grace-period", "20", *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        end = time.monotonic() + START_TIMEOUT_S
        while not self.port_file.exists():
            assert self.proc.poll() is None, f"supervisor exited: {self.lines[-5:]}"
            assert time.monotonic() < end, "workers did not start in time"
            time.sleep(0.1)
        self.port = int(self.port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.lines.append(json.loads(line))
            except json.JSONDecodeError:
                self.lines.append({"event": "text", "text": line})

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def worker_pids(self) -> set[int]:
        """Pids of the workers running now (started and not seen dying)."""
        started = {line["worker_pid"] for line in self.events("worker_started")}
        died = {line["worker_pid"] for line in self.events("worker_died")}
        return started - died

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reader.join(10)
        return self.proc.wait()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def workers(long_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    running = Workers(long_models, tmp_path_factory.mktemp("workers"))
    yield running
    running.stop()


def G(**fields: Any) -> pb.GenerateRequest:
    fields.setdefault("model", GEN)
    return pb.GenerateRequest(**fields)


def test_every_rpc_on_the_shared_port(workers: Workers) -> None:
    with grpc.insecure_channel(workers.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert {m.name for m in stub.ListModels(pb.ListModelsRequest()).models} == {
            "tiny-classifier", GEN,
        }  # fmt: skip
        assert len(stub.Classify(pb.ClassifyRequest(texts=["good", "bad"])).results) == 2
        answers = list(stub.ClassifyStream(iter([pb.ClassifyRequest(texts=["a"])] * 3)))
        assert len(answers) == 3
        whole = stub.Generate(G(prompt="the", max_new_tokens=6))
        chunks = list(stub.GenerateStream(G(prompt="the", max_new_tokens=6)))
        assert "".join(c.text for c in chunks) == whole.text
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        kserve = kgrpc.GRPCInferenceServiceStub(channel)
        assert kserve.ServerLive(kpb.ServerLiveRequest()).live
        assert kserve.ModelReady(kpb.ModelReadyRequest(name="tiny-classifier")).ready
        text = kpb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1],
            contents=kpb.InferTensorContents(bytes_contents=[b"good"]),
        )  # fmt: skip
        out = kserve.ModelInfer(kpb.ModelInferRequest(model_name="tiny-classifier", inputs=[text]))
        assert out.model_name == "tiny-classifier" and out.outputs
    with urllib.request.urlopen(f"http://127.0.0.1:{workers.http_port}/v1/models", timeout=10) as r:
        assert {m["id"] for m in json.loads(r.read())["data"]} == {"tiny-classifier", GEN}


def test_connections_spread_over_both_workers(workers: Workers) -> None:
    before = len(workers.events("rpc"))
    for i in range(24):  # one connection each: the kernel picks a worker per connection
        with grpc.insecure_channel(workers.address) as channel:
            pb_grpc.InferenceStub(channel).Classify(
                pb.ClassifyRequest(texts=["spread"], request_id=f"spread-{i}")
            )
    wait_for(lambda: len([ln for ln in workers.events("rpc")[before:]
                          if ln.get("request_id", "").startswith("spread-")]) == 24)  # fmt: skip
    lines = [ln for ln in workers.events("rpc") if ln.get("request_id", "").startswith("spread-")]
    pids = {line["pid"] for line in lines}
    assert pids == workers.worker_pids() and len(pids) == 2, pids
    assert all(line["code"] == "OK" for line in lines)


def test_one_metrics_view(workers: Workers) -> None:
    url = f"http://127.0.0.1:{workers.metrics_port}/metrics"
    name, labels = "headrace_requests_total", {"rpc": "Classify", "code": "OK"}
    base = scrape(url, name, labels) or 0.0
    for _ in range(6):
        with grpc.insecure_channel(workers.address) as channel:
            pb_grpc.InferenceStub(channel).Classify(pb.ClassifyRequest(texts=["m"]))
    wait_for(lambda: (scrape(url, name, labels) or 0.0) - base == 6)  # summed over both
    http = f"http://127.0.0.1:{workers.http_port}/metrics"
    assert scrape(http, name, labels) == scrape(url, name, labels)  # each worker shows the sum


def test_cancel_stops_generation_in_its_worker(workers: Workers) -> None:
    with grpc.insecure_channel(workers.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.GenerateStream(
            G(prompt="the", max_new_tokens=400, request_id="cancel-1",
              sampling=pb.SamplingParams(ignore_eos=True))
        )  # fmt: skip
        next(call)
        call.cancel()
        wait_for(lambda: any(ln.get("request_id") == "cancel-1" for ln in workers.events("rpc")))
        line = next(ln for ln in workers.events("rpc") if ln.get("request_id") == "cancel-1")
        assert line["code"] == "CANCELLED" and line["completion_tokens"] < 300, line
        assert stub.Generate(G(prompt="the", max_new_tokens=3)).usage.completion_tokens <= 3


def test_killed_worker_is_replaced_and_no_call_is_lost(workers: Workers) -> None:
    errors: list[BaseException] = []
    done = threading.Event()
    calls = [0]

    # calls on the killed worker's connections end UNAVAILABLE before any answer: the SDK
    # retries them on a new connection, which the live worker accepts
    patient = RetryPolicy(max_attempts=5, initial_backoff=0.2, max_backoff=2.0)

    def caller() -> None:
        with Client(workers.address, timeout=30, retry=patient) as client:
            while not done.is_set():
                try:
                    client.classify(["still here"])
                    calls[0] += 1
                except Exception as exc:  # a lost call
                    errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: calls[0] > 20)
    before = workers.worker_pids()
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in workers.worker_pids(), timeout=30)
    wait_for(lambda: len(workers.worker_pids()) == 2, timeout=30)  # restarted
    [new] = workers.worker_pids() - before
    wait_for(lambda: any(line.get("pid") == new for line in workers.events("serving")), timeout=60)
    time.sleep(1.0)
    done.set()
    for t in threads:
        t.join(60)
    assert not errors, [repr(e) for e in errors[:3]]
    assert calls[0] > 40


def test_a_worker_that_cannot_start_stops_the_start(tiny_models: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:  # a port held without SO_REUSEPORT: no worker can bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = subprocess.run(
            [sys.executable, "-m", "headrace.server", "serve", "--models", str(tiny_models),
             "--workers", "2", "--port", port, "--poll-interval", "0"],
            capture_output=True, text=True, timeout=START_TIMEOUT_S,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "worker_failed_to_start" in proc.stderr


def test_sigterm_drains_every_worker(long_models: Path, tmp_path: Path) -> None:
    running = Workers(long_models, tmp_path)
    pids = running.worker_pids()
    results: list[list[pb.GenerateChunk]] = []
    channels = [grpc.insecure_channel(running.address) for _ in range(6)]
    calls = [
        pb_grpc.InferenceStub(ch).GenerateStream(
            G(prompt="the", max_new_tokens=200, sampling=pb.SamplingParams(ignore_eos=True))
        )
        for ch in channels
    ]
    firsts = [next(call) for call in calls]  # every stream is running
    running.proc.send_signal(signal.SIGTERM)
    for first, call in zip(firsts, calls, strict=True):
        results.append([first, *call])
    assert all(r[-1].finish_reason == pb.LENGTH for r in results)  # each finished its work
    assert all(sum(len(c.token_ids) for c in r) == 200 for r in results)
    assert running.proc.wait(60) == 0
    for ch in channels:
        ch.close()
    running.stop()
    stopped = {line["pid"] for line in running.events("stopped") if line.get("worker") != "supervisor"}
    assert stopped == pids, (stopped, pids)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

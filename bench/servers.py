"""Servers under test as child processes: start, wait until ready, measure, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server child process, its log in `log_path`, stopped with SIGTERM then SIGKILL."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=str(cwd or ROOT),
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, probe: Callable[[], bool], timeout: float) -> float:
        """Poll `probe` until it returns True -> seconds it took; raises with the log's tail."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(Exception):
                if probe():
                    return time.monotonic() - t0
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def rss_mb(self) -> float:
        """Resident memory of the server and its children, MiB."""
        proc = psutil.Process(self.pid)
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def models_ready(target: str, names: Sequence[str]) -> bool:
    """headrace's ListModels lists every one of `names`."""
    import grpc
    from headrace.v1 import inference_pb2 as pb
    from headrace.v1 import inference_pb2_grpc as pbg

    with grpc.insecure_channel(target) as channel:
        resp = pbg.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=2)
    listed = {m.name for m in resp.models}
    return all(n in listed for n in names)


def model_info(target: str, name: str) -> dict[str, str]:
    import grpc
    from headrace.v1 import inference_pb2 as pb
    from headrace.v1 import inference_pb2_grpc as pbg

    with grpc.insecure_channel(target) as channel:
        resp = pbg.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
    for m in resp.models:
        if m.name == name:
            return {
                "backend": m.backend,
                "precision": m.precision,
                "device": m.device,
                "profile": m.profile,
                "version": m.versions[0] if m.versions else "",
                "max_batch": str(m.limits.max_batch),
            }
    return {}


def headrace_labels(target: str, model: str, texts: Sequence[str]) -> list[str]:
    """The top label headrace gives each text (one request per text)."""
    import grpc
    from headrace.v1 import inference_pb2 as pb
    from headrace.v1 import inference_pb2_grpc as pbg

    with grpc.insecure_channel(target) as channel:
        stub = pbg.InferenceStub(channel)
        return [
            stub.Classify(pb.ClassifyRequest(model=model, texts=[t]), timeout=30)
            .results[0]
            .labels[0]
            .name
            for t in texts
        ]


def kserve_labels(target: str, model: str, texts: Sequence[str]) -> list[str]:
    """The top label headrace's KServe v2 front gives each text (one request per text)."""
    import grpc

    from bench.kserve import MODEL_INFER, headrace_request, headrace_top_labels

    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        return [
            headrace_top_labels(
                infer(headrace_request(model, [t]).SerializeToString(), timeout=30)
            )[0]
            for t in texts
        ]


def mlserver_labels(target: str, model: str, texts: Sequence[str]) -> list[str]:
    """The top label MLServer's Hugging Face runtime gives each text (one request per text)."""
    import json

    import grpc

    from bench.kserve import MODEL_INFER, mlserver_request, mlserver_top_label

    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        out = []
        for t in texts:
            raw = mlserver_top_label(
                infer(mlserver_request(model, t).SerializeToString(), timeout=60)
            )
            pred = json.loads(raw)
            out.append(str((pred[0] if isinstance(pred, list) else pred)["label"]))
        return out


def channel_ready(target: str) -> bool:
    import grpc

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=2)
    return True


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def scrape_metric(
    metrics_port: int, name: str, labels: dict[str, str] | None = None
) -> float | None:
    """The value of one metric on headrace's /metrics (summed over series matching `labels`)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return metric_value(resp.read().decode(), name, labels)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Sum of the samples of `name` in Prometheus text format whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series = head[len(name) :]
        if series and not series.startswith("{"):
            continue  # a longer metric name sharing the prefix
        if labels and not all(f'{k}="{v}"' in series for k, v in labels.items()):
            continue
        total += float(value)
        found = True
    return total if found else None


def headrace_cmd(models: Path, port: int, metrics_port: int, profile: str) -> list[str]:
    """`headrace serve` from this interpreter's environment."""
    exe = Path(sys.executable).with_name("headrace")
    head = (
        [str(exe)]
        if exe.exists()
        else [
            sys.executable,
            "-c",
            "import sys; from headrace.server.cli import main; sys.exit(main())",
        ]
    )
    return [
        *head,
        "serve",
        "--models",
        str(models),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--profile",
        profile,
        "--log-level",
        "warning",
    ]


def single_model_repo(models: Path, names: Sequence[str], dest: Path) -> Path:
    """A repository holding only `names` (links into `models`), so one server loads only them."""
    if dest.exists():
        for child in dest.iterdir():
            child.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        (dest / n).symlink_to((models / n).resolve(), target_is_directory=True)
    return dest

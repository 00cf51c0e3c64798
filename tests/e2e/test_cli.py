"""The `headrace` command: help, `models`, config errors, and `serve` in a real process."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.certs import issue, make_ca, needs_openssl

HEADRACE = [sys.executable, "-m", "headrace.server"]


def headrace(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HEADRACE, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands_and_every_serve_flag() -> None:
    top = headrace("--help")
    assert top.returncode == 0
    for command in ("serve", "models", "build"):
        assert command in top.stdout
    serve = headrace("serve", "--help")
    assert serve.returncode == 0
    for flag in ("--config", "--models", "--host", "--port", "--profile", "--device",
                 "--metrics-port", "--http-port", "--grace-period", "--poll-interval", "--load-timeout",
                 "--intra-op-threads",
                 "--inter-op-threads", "--default-classify-model", "--default-generate-model",
                 "--log-format", "--log-level", "--port-file", "--max-message-mb",
                 "--tls-cert", "--tls-key", "--tls-client-ca", "--metrics-tls",
                 "--api-key-file", "--auth-exempt", "--workers", "--stream-interval",
                 "--stream-interval-ms", "--otlp-endpoint"):  # fmt: skip
        assert flag in serve.stdout, flag
    assert headrace("models", "--help").returncode == 0
    assert headrace("build", "--help").returncode == 0
    assert headrace().returncode == 2  # no command: help and a usage error


def test_cli_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, headrace.server.cli\n"
        "heavy = [m for m in ('grpc', 'torch', 'onnxruntime', 'structlog', 'numpy') if m in sys.modules]\n"
        "print(heavy); sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_models_lists_repository(tiny_models: Path) -> None:
    table = headrace("models", "--models", str(tiny_models))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "VERSION", "TASK"]
    assert any(line.split()[:3] == ["tiny-classifier", "1", "classify"] for line in lines)
    assert any(line.split()[:3] == ["tiny-generator", "1", "generate"] for line in lines)
    rows = json.loads(headrace("models", "--models", str(tiny_models), "--json").stdout)
    assert {(r["name"], r["version"], r["task"]) for r in rows} == {
        ("tiny-classifier", "1", "classify"),
        ("tiny-generator", "1", "generate"),
    }
    assert rows[0]["artifacts"] == ["torch:fp32:hf"]


def test_serve_rejects_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('models = "."\nportt = 1\n')
    proc = headrace("serve", "--config", str(config))
    assert proc.returncode == 2 and "portt" in proc.stderr
    proc = headrace("serve")
    assert proc.returncode == 2 and "--models" in proc.stderr
    proc = headrace("serve", "--models", str(tmp_path / "missing"), "--port", "0")
    assert proc.returncode == 1 and "missing" in proc.stderr


@needs_openssl
def test_serve_names_the_flag_of_a_bad_tls_or_key_file(tiny_models: Path, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    server, other = issue(ca, tmp_path / "server", "localhost"), issue(ca, tmp_path / "o", "x")
    keys = tmp_path / "keys"
    keys.write_text("# none yet\n")
    serve = ["serve", "--models", str(tiny_models), "--port", "0"]
    cases = [
        (["--tls-cert", str(server.cert), "--tls-key", str(other.key)], "--tls-key .* does not match"),
        (["--tls-cert", str(server.key), "--tls-key", str(server.key)], "--tls-cert .* not a PEM"),
        (["--tls-cert", str(server.cert)], "go together"),
        (["--tls-cert", str(server.cert), "--tls-key", str(server.key),
          "--tls-client-ca", str(tmp_path / "nope.pem")], "--tls-client-ca .* cannot read"),
        (["--api-key-file", str(keys)], "--api-key-file .* holds no key"),
        (["--auth-exempt", "models"], "auth_exempt takes"),
    ]  # fmt: skip
    for flags, needle in cases:
        proc = headrace(*serve, *flags)
        assert proc.returncode == 2, (flags, proc.stderr)
        assert re.search(needle, proc.stderr), (flags, proc.stderr)
        assert "Traceback" not in proc.stderr


def _wait_port(port_file: Path, proc: subprocess.Popen[str], timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port_file.is_file() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("server did not write its port")


@pytest.mark.timeout(120)
def test_sigterm_drains_stream_then_exits_zero(long_models: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    config = tmp_path / "server.toml"
    config.write_text('grace_period_s = 20\npoll_interval_s = 0\nlog_level = "info"\n')
    proc = subprocess.Popen(
        [*HEADRACE, "serve", "--config", str(config), "--models", str(long_models),
         "--port", "0", "--port-file", str(port_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = _wait_port(port_file, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            req = pb.GenerateRequest(model="long-generator", prompt="the", max_new_tokens=300)
            call = stub.GenerateStream(req)
            assert next(call).model == "long-generator"
            os.kill(proc.pid, signal.SIGTERM)
            chunks = list(call)  # the stream in flight runs to its end
            assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in proc.stderr.read().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), lines  # JSON lines only: no tqdm bars
    events = [json.loads(line) for line in lines]
    names = [e["event"] for e in events]
    assert names.index("serving") < names.index("draining") < names.index("stopped")
    serving = next(e for e in events if e["event"] == "serving")
    assert serving["port"] == port
    rpc = next(e for e in events if e["event"] == "rpc" and e["rpc"] == "GenerateStream")
    assert rpc["code"] == "OK" and rpc["model"] == "long-generator"
    assert rpc["completion_tokens"] == chunks[-1].usage.completion_tokens
    for key in ("request_id", "model_version", "latency_ms", "prompt_tokens", "peer"):
        assert key in rpc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(120)
def test_serve_health_metrics_and_sigint(tiny_models: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    metrics_port = _free_port()
    proc = subprocess.Popen(
        [*HEADRACE, "serve", "--models", str(tiny_models), "--port", "0", "--port-file",
         str(port_file), "--log-format", "console", "--profile", "cpu",
         "--metrics-port", str(metrics_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = _wait_port(port_file, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="tiny-generator"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.InferenceStub(channel)
            stub.Classify(pb.ClassifyRequest(texts=["counted"]))
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        from prometheus_client.parser import text_string_to_metric_families

        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        key = (("code", "OK"), ("model", "tiny-classifier"), ("rpc", "Classify"))
        assert samples[("headrace_requests_total", key)] == 1.0
        assert ("headrace_request_duration_seconds_count", key[1:]) in samples
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert "serving" in err
    # the startup heap left out of the collector's scans, once the models were loaded
    frozen = re.search(r"heap_frozen\s.*objects=(\d+)", err)
    assert frozen is not None and int(frozen.group(1)) > 10_000


@pytest.mark.timeout(120)
def test_sigterm_drains_an_sse_stream(long_models: Path, tmp_path: Path) -> None:
    """uvicorn runs inside headrace's loop: SIGTERM is headrace's drain, not uvicorn's exit."""
    port_file, http_port = tmp_path / "port", _free_port()
    proc = subprocess.Popen(
        [*HEADRACE, "serve", "--models", str(long_models), "--port", "0", "--port-file",
         str(port_file), "--http-port", str(http_port), "--poll-interval", "0",
         "--grace-period", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_port(port_file, proc)
        base = f"http://127.0.0.1:{http_port}"
        with urllib.request.urlopen(f"{base}/health/ready", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ready"
        body = {"model": "long-generator", "prompt": "the", "max_tokens": 300, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
        req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=60) as stream:
            first = stream.readline()
            assert first.startswith(b"data: ")
            os.kill(proc.pid, signal.SIGTERM)
            rest = stream.read().decode()  # the stream in flight runs to its end
        assert rest.rstrip().endswith("data: [DONE]") and '"completion_tokens":300' in rest
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.index("http_serving") < names.index("serving") < names.index("draining")
    assert names.index("draining") < names.index("stopped")
    http = next(e for e in events if e["event"] == "rpc" and e["rpc"] == "/v1/completions")
    assert (http["front"], http["code"], http["http_status"]) == ("http", "OK", 200)
    assert (http["stream"], http["completion_tokens"]) == (True, 300)


@needs_openssl
@pytest.mark.timeout(120)
def test_serve_with_tls_keys_and_tls_metrics(tiny_models: Path, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    server = issue(ca, tmp_path / "server", "localhost")
    key = "hr_" + secrets.token_hex(16)
    (tmp_path / "keys").write_text(f"{key}\n")
    port_file, metrics_port = tmp_path / "port", _free_port()
    proc = subprocess.Popen(
        [*HEADRACE, "serve", "--models", str(tiny_models), "--port", "0", "--port-file",
         str(port_file), "--profile", "cpu", "--tls-cert", str(server.cert), "--tls-key",
         str(server.key), "--api-key-file", str(tmp_path / "keys"), "--metrics-port",
         str(metrics_port), "--metrics-tls"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = _wait_port(port_file, proc)
        creds = grpc.ssl_channel_credentials(ca.cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            stub = pb_grpc.InferenceStub(channel)
            stub.Classify(
                pb.ClassifyRequest(texts=["x"]), metadata=[("authorization", f"Bearer {key}")]
            )
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(pb.ClassifyRequest(texts=["x"]))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        url = f"https://localhost:{metrics_port}/metrics"
        context = ssl.create_default_context(cafile=ca.cert)
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            assert b"headrace_requests_total" in response.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10, context=context)
        assert refused.value.code == 401
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stderr.read()
    assert key not in log and '"tls":true' in log.replace(" ", "")

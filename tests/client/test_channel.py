"""Channel options: targets, balancing, TLS, message size, and the service config."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from headrace.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
)
from headrace.client._channel import credentials, normalize_target, service_config

from tests.client.conftest import ScriptedInference, ServerThread

# -- target strings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("localhost:50051", "localhost:50051"),
        ("dns:///models.internal:443", "dns:///models.internal:443"),
        (["10.0.0.1:50051"], "10.0.0.1:50051"),
        (["10.0.0.1:50051", "10.0.0.2:50052"], "ipv4:10.0.0.1:50051,10.0.0.2:50052"),
        (["[::1]:50051", "[fe80::1]:7"], "ipv6:[::1]:50051,[fe80::1]:7"),
    ],
)
def test_normalize_target(target: str | list[str], expected: str) -> None:
    assert normalize_target(target) == expected


@pytest.mark.parametrize(
    "target",
    ["", [], ["host-a:1", "host-b:2"], ["10.0.0.1", "10.0.0.2:1"], ["10.0.0.1:1", "[::1]:2"]],
)
def test_bad_targets_are_rejected(target: str | list[str]) -> None:
    with pytest.raises(ValueError):
        normalize_target(target)


def test_service_config_retries_every_call_but_classify_stream() -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=1.5)
    config = json.loads(service_config(policy, "round_robin"))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    # round_robin skips an address whose server drains (client-side health checking)
    assert config["healthCheckConfig"] == {"serviceName": "headrace.v1.Inference"}
    (method,) = config["methodConfig"]
    assert [n["method"] for n in method["name"]] == [
        "Classify",
        "ListModels",
        "Generate",
        "GenerateStream",
    ]
    assert {n["service"] for n in method["name"]} == {"headrace.v1.Inference"}
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.05s",
        "maxBackoff": "1.5s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    assert "retryThrottling" in config
    bare = json.loads(service_config(None, "pick_first"))
    assert bare == {"loadBalancingConfig": [{"pick_first": {}}]}


def test_retry_policy_validation() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=9)
    with pytest.raises(ValueError):
        RetryPolicy(retryable_codes=())


def test_credentials_validation(tmp_path: Path) -> None:
    assert credentials(False, None, None, None) is None
    assert isinstance(credentials(True, None, None, None), grpc.ChannelCredentials)
    with pytest.raises(ValueError):
        credentials(False, b"pem", None, None)
    with pytest.raises(ValueError):
        credentials(True, None, b"cert", None)
    with pytest.raises(FileNotFoundError):
        credentials(True, tmp_path / "missing.pem", None, None)


# -- balancing over real servers -------------------------------------------------------


def test_multi_address_target_round_robins_over_servers() -> None:
    a = ServerThread(ScriptedInference("a")).start()
    b = ServerThread(ScriptedInference("b")).start()
    try:
        with Client([a.address, b.address]) as client:
            assert client.target == f"ipv4:{a.address},{b.address}"
            client.wait_ready(timeout=5)
            for _ in range(200):
                client.classify("x")
                if a.record.calls["Classify"] and b.record.calls["Classify"]:
                    break
        assert a.record.calls["Classify"] > 0 and b.record.calls["Classify"] > 0
    finally:
        a.stop()
        b.stop()


def test_multi_address_target_skips_a_dead_address(server: ServerThread) -> None:
    # Port 1 refuses connections: round_robin sends every call to the live server.
    with Client(["127.0.0.1:1", server.address], timeout=5) as client:
        for _ in range(5):
            assert client.classify("x").model == "tiny"


def test_dns_target(server: ServerThread) -> None:
    with Client(f"dns:///localhost:{server.port}", timeout=5) as client:
        assert client.classify("x").model == "tiny"


def test_max_message_bytes_limits_what_is_sent(server: ServerThread) -> None:
    with Client(server.address, max_message_bytes=1024) as client:
        assert client.classify("small").model == "tiny"
        with pytest.raises(ResourceExhausted):
            client.classify("x" * 4096)


def test_keepalive_options_are_accepted(server: ServerThread) -> None:
    with Client(server.address, keepalive_time=30, keepalive_timeout=5) as client:
        assert client.classify("x").model == "tiny"


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (it is its own CA)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    srv = ServerThread(ScriptedInference(), creds).start()
    try:
        with Client(srv.address, tls=True, root_certificates=cert, timeout=5) as client:
            assert client.classify("x").model == "tiny"
        with Client(srv.address, tls=True, root_certificates=cert.read_bytes()) as client:
            assert client.health().value == "serving"

        async def main() -> None:
            async with AsyncClient(srv.address, tls=True, root_certificates=cert) as client:
                assert (await client.classify("x")).model == "tiny"

        asyncio.run(main())
        # Plaintext to a TLS port, and TLS without trusting the certificate, both fail.
        with Client(srv.address, retry=None, timeout=5) as client, pytest.raises(Unavailable):
            client.classify("x")
        with Client(srv.address, tls=True, retry=None, timeout=5) as client:
            with pytest.raises(Unavailable):
                client.classify("x")
    finally:
        srv.stop()


def test_mutual_tls(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    creds = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=cert.read_bytes(),
        require_client_auth=True,
    )
    srv = ServerThread(ScriptedInference(), creds).start()
    try:
        with Client(
            srv.address, tls=True, root_certificates=cert, client_cert=cert, client_key=key
        ) as client:
            assert client.classify("x", timeout=5).model == "tiny"
        with Client(srv.address, tls=True, root_certificates=cert, retry=None) as client:
            with pytest.raises(Unavailable):
                client.classify("x", timeout=5)
    finally:
        srv.stop()


def test_wait_for_ready_waits_until_the_deadline() -> None:
    # Fail-fast gives UNAVAILABLE at once; wait_for_ready queues the call until its deadline.
    with Client("127.0.0.1:1", wait_for_ready=True, retry=None) as client:
        with pytest.raises(DeadlineExceeded):
            client.classify("x", timeout=0.3)


def test_compression_and_user_agent(server: ServerThread) -> None:
    with Client(
        server.address, compression=grpc.Compression.Gzip, user_agent="sentiment-batch/2.1"
    ) as client:
        assert client.classify("x" * 1000).model == "tiny"
    assert server.record.metadata[-1]["user-agent"].startswith("sentiment-batch/2.1")

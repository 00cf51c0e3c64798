"""API keys and TLS on the HTTP front of a real server: the same key file, the same
certificates and the same scoping as the gRPC port (tests/e2e/test_security.py).

The `openai` SDK over HTTPS reads the refusals (401 AuthenticationError, 403
PermissionDeniedError); raw requests check health, metrics and the page.
"""

from __future__ import annotations

import json
import secrets
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from headrace.server import auth
from headrace.server.auth import key_id
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.certs import Pem, issue, make_ca
from tests.e2e.conftest import RunningServer, free_port, make_config

GEN, CLS = "tiny-generator", "tiny-classifier"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    root = tmp_path_factory.mktemp("http-pki")
    ca, other = make_ca(root / "ca"), make_ca(root / "other-ca", "another CA")
    return {
        "ca": ca,
        "server": issue(ca, root / "server", "localhost"),
        "client": issue(ca, root / "client", "client-a"),
        "rogue": issue(other, root / "rogue", "client-b"),
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    found = {"any": "hr_" + secrets.token_hex(16), "classifier": "hr_" + secrets.token_hex(16)}
    path = tmp_path_factory.mktemp("http-keys") / "keys"
    path.write_text(f"{found['any']}\n{found['classifier']} {CLS}\n")
    return {**found, "path": path}


@pytest.fixture(scope="module")
def secured(
    tiny_models: Path, pki: dict[str, Pem], keys: dict[str, Any]
) -> Iterator[RunningServer]:
    """TLS and API keys; no metrics port, so /metrics is on the HTTP port."""
    server = pki["server"]
    config = make_config(tiny_models, http_port=free_port(), tls_cert=server.cert,
                         tls_key=server.key, api_key_file=keys["path"])  # fmt: skip
    running = RunningServer(config)
    yield running
    running.stop()


def trusting(ca: Pem, client: Pem | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca.cert)
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


def url(running: RunningServer, path: str) -> str:
    assert running.server.http is not None
    return f"https://localhost:{running.server.http.port}{path}"


def request(
    target: str, context: ssl.SSLContext, key: str | None = None, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(target, data=data)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def sdk(running: RunningServer, ca: Pem, key: str) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(verify=trusting(ca))
    return openai.OpenAI(base_url=url(running, "/v1"), api_key=key, max_retries=0, http_client=http)


def test_keys_on_the_http_port(
    secured: RunningServer, pki: dict[str, Pem], keys: dict[str, Any]
) -> None:
    ctx = trusting(pki["ca"])
    wrong = "hr_" + secrets.token_hex(16)
    for key in (None, wrong):
        for path, body in [("/v1/models", None), ("/v1/completions", {"prompt": "hi"}),
                           ("/v1/classify", {"texts": ["x"]}), ("/metrics", None)]:  # fmt: skip
            status, headers, raw = request(url(secured, path), ctx, key, body)
            assert status == 401, (path, key)
            assert headers["www-authenticate"] == "Bearer"
            error = json.loads(raw)["error"]
            assert (error["code"], error["message"]) == (
                "invalid_api_key",
                auth.UNAUTHENTICATED_MESSAGE,
            )
    # health is exempt by default (auth_exempt), the page is static; the page's calls need the key
    assert request(url(secured, "/health/ready"), ctx)[0] == 200
    status, headers, page = request(url(secured, "/"), ctx)
    assert status == 200 and b"api-key" in page
    status, _, metrics = request(url(secured, "/metrics"), ctx, keys["any"])
    assert status == 200 and b"headrace_http_requests_total" in metrics
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(secured, pki["ca"], wrong).models.list()
    assert info.value.code == "invalid_api_key"
    client = sdk(secured, pki["ca"], keys["any"])
    assert {m.id for m in client.models.list()} == {GEN, CLS}
    stream = client.completions.create(model=GEN, prompt="the", max_tokens=4, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert sum(1 for _ in stream) >= 2


def test_a_scoped_key_sees_and_uses_its_models_only(
    secured: RunningServer, pki: dict[str, Pem], keys: dict[str, Any]
) -> None:
    client = sdk(secured, pki["ca"], keys["classifier"])
    assert [m.id for m in client.models.list()] == [CLS]
    assert client.models.retrieve(CLS).id == CLS
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.models.retrieve(GEN)
    assert info.value.code == "permission_denied"
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model=GEN, messages=[{"role": "user", "content": "hi"}])
    assert GEN in info.value.message and keys["classifier"] not in info.value.message
    with pytest.raises(openai.PermissionDeniedError):  # the default generate model is GEN
        client.completions.create(model="", prompt="hi", max_tokens=2)
    ctx = trusting(pki["ca"])
    status, _, raw = request(
        url(secured, "/v1/classify"), ctx, keys["classifier"], {"texts": ["good"]}
    )
    assert status == 200 and json.loads(raw)["model"] == CLS
    # the same key on the gRPC port: one key file, one scope for every front
    creds = grpc.ssl_channel_credentials(pki["ca"].cert.read_bytes())
    with grpc.secure_channel(f"localhost:{secured.port}", creds) as channel:
        stub = pb_grpc.InferenceStub(channel)
        metadata = [("authorization", f"Bearer {keys['classifier']}")]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(pb.GenerateRequest(model=GEN, prompt="hi"), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_http_port_speaks_tls_only(secured: RunningServer, pki: dict[str, Pem]) -> None:
    plain = url(secured, "/health/live").replace("https:", "http:")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(plain, timeout=10)
    with pytest.raises(urllib.error.URLError):  # a client that does not trust the server's CA
        urllib.request.urlopen(url(secured, "/health/live"), timeout=10,
                               context=ssl.create_default_context())  # fmt: skip


def test_mutual_tls_on_the_http_port(
    tiny_models: Path, pki: dict[str, Pem], start_server: Any
) -> None:
    s = pki["server"]
    running = start_server(tiny_models, http_port=free_port(), tls_cert=s.cert, tls_key=s.key,
                           tls_client_ca=pki["ca"].cert)  # fmt: skip
    target = url(running, "/v1/models")
    status, _, raw = request(target, trusting(pki["ca"], pki["client"]))
    assert status == 200 and len(json.loads(raw)["data"]) == 2
    for client in (None, pki["rogue"]):  # no certificate; one from another CA
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            request(target, trusting(pki["ca"], client))


def test_key_ids_not_keys_in_the_log(
    secured: RunningServer,
    pki: dict[str, Pem],
    keys: dict[str, Any],
    capfd: pytest.CaptureFixture[str],
) -> None:
    ctx = trusting(pki["ca"])
    assert request(url(secured, "/v1/classify"), ctx, keys["any"], {"texts": ["x"]})[0] == 200
    assert request(url(secured, "/v1/classify"), ctx, "hr_nope", {"texts": ["x"]})[0] == 401
    log = capfd.readouterr().err
    assert keys["any"] not in log and "hr_nope" not in log
    assert key_id("hr_nope") in log  # the refusal, by key id

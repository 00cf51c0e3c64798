"""The HTTP door: BearerAuth and the reloading SSLContext on a real uvicorn socket.

A small Starlette app stands in for a front: `/v1/models` lists what the caller may
see, `/v1/classify` asks `authorize_model` for its body's model, as a front does
once it has parsed the request. The `openai` SDK checks the refusal shape.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from headrace.server import auth
from headrace.server.auth import Authenticator, key_id
from headrace.server.errors import ModelForbidden
from headrace.server.http_auth import BearerAuth
from headrace.server.logs import configure_logging
from headrace.server.tls import ServerTls, TlsFiles
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, Router

from tests.certs import Pem, issue, make_ca, needs_openssl

MODELS = ("tiny-classifier", "tiny-generator")


async def models(request: Request) -> JSONResponse:
    names = auth.allowed_models(MODELS)
    return JSONResponse({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})


async def classify(request: Request) -> JSONResponse:
    body = await request.json()
    try:
        auth.authorize_model(body["model"])
    except ModelForbidden as exc:
        error = {"message": str(exc), "type": "invalid_request_error", "param": "model"}
        return JSONResponse({"error": {**error, "code": "permission_denied"}}, status_code=403)
    return JSONResponse({"model": body["model"], "key_id": auth.current_caller().key_id})


async def plain(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path})


ROUTER = Router(
    [
        Route("/v1/models", models),
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/health/live", plain),
        Route("/metrics", plain),
        Route("/", plain),
    ]
)


class Uvicorn:
    """uvicorn serving `app` on 127.0.0.1 from a loop of its own."""

    def __init__(self, app: Any, ssl_context: ssl.SSLContext | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False)
        config.load()
        config.ssl = ssl_context  # what a front sets after load(): the reloading context
        self.server = uvicorn.Server(config)
        self.server.lifespan = config.lifespan_class(config)  # set by serve(), which is not used
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(
            self.server.startup(sockets=[self.sock]), self.loop
        ).result(10)
        self.scheme = "https" if ssl_context else "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://localhost:{self.port}{path}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.sock.close()


@pytest.fixture()
def serve() -> Iterator[Callable[..., Uvicorn]]:
    started: list[Uvicorn] = []

    def start(app: Any, ssl_context: ssl.SSLContext | None = None) -> Uvicorn:
        started.append(Uvicorn(app, ssl_context))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Any]:
    found = {"any": "hr_" + secrets.token_hex(16), "classifier": "hr_" + secrets.token_hex(16)}
    path = tmp_path / "keys"
    path.write_text(f"{found['any']}\n{found['classifier']} tiny-classifier\n")
    return {**found, "path": path}


def request(
    url: str, key: str | None = None, body: dict[str, Any] | None = None, **kwargs: Any
) -> tuple[int, dict[str, Any], Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10, **kwargs) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def test_every_path_but_health_and_the_page_wants_a_key(serve, keys, capfd) -> None:
    configure_logging("json", "info")
    server = serve(BearerAuth(ROUTER, Authenticator(keys["path"])))
    wrong = "hr_" + secrets.token_hex(16)
    for key in (None, wrong):
        for path, body in [("/v1/models", None), ("/v1/classify", {"model": "tiny-classifier"}),
                           ("/metrics", None)]:  # fmt: skip
            status, headers, answer = request(server.url(path), key, body)
            assert status == 401, (path, key)
            assert headers["www-authenticate"] == "Bearer"
            assert answer["error"]["code"] == "invalid_api_key"
            assert answer["error"]["message"] == auth.UNAUTHENTICATED_MESSAGE
    assert request(server.url("/health/live"))[0] == 200
    assert request(server.url("/"))[0] == 200
    status, _, answer = request(
        server.url("/v1/classify"), keys["any"], {"model": "tiny-generator"}
    )
    assert status == 200 and answer["key_id"] == key_id(keys["any"])
    log = capfd.readouterr().err
    assert wrong not in log and keys["any"] not in log and key_id(wrong) in log


def test_a_scoped_key_over_http(serve, keys) -> None:
    server = serve(BearerAuth(ROUTER, Authenticator(keys["path"])))
    key = keys["classifier"]
    assert request(server.url("/v1/classify"), key, {"model": "tiny-classifier"})[0] == 200
    status, _, answer = request(server.url("/v1/classify"), key, {"model": "tiny-generator"})
    assert status == 403 and answer["error"]["code"] == "permission_denied"
    listed = request(server.url("/v1/models"), key)[2]
    assert [m["id"] for m in listed["data"]] == ["tiny-classifier"]


def test_exemptions_follow_the_config(serve, keys) -> None:
    open_metrics = Authenticator(keys["path"], exempt=("metrics",))
    server = serve(BearerAuth(ROUTER, open_metrics))
    assert request(server.url("/metrics"))[0] == 200
    assert request(server.url("/health/live"))[0] == 401  # health no longer exempt
    assert request(server.url("/health/live"), keys["any"])[0] == 200


def test_the_openai_sdk_reads_the_refusals(serve, keys) -> None:
    import openai

    server = serve(BearerAuth(ROUTER, Authenticator(keys["path"])))
    base = server.url("/v1")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="hr_wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=base, api_key=keys["classifier"], max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-classifier"]


# -- TLS on a Python ssl server: mutual TLS and rotation ------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    root = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(root / "ca"), make_ca(root / "other-ca", "another CA")
    return {
        "ca": ca,
        "other-ca": other,
        "server": issue(ca, root / "server", "localhost"),
        "other-server": issue(other, root / "other-server", "localhost"),
        "client": issue(ca, root / "client", "client-a"),
    }


def trusting(ca: Pem, client: Pem | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca.cert)
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


@needs_openssl
def test_http_over_mutual_tls(serve, pki) -> None:
    s = pki["server"]
    tls = ServerTls(TlsFiles(s.cert, s.key, pki["ca"].cert))
    server = serve(ROUTER, tls.ssl_context())
    assert request(server.url("/"), context=trusting(pki["ca"], pki["client"]))[0] == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        request(server.url("/"), context=trusting(pki["ca"]))  # no client certificate
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        request(server.url("/").replace("https:", "http:"))  # plaintext to the TLS port


@needs_openssl
def test_http_certificates_rotate_without_a_restart(serve, pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki["server"].cert, cert)
    shutil.copy(pki["server"].key, key)
    tls = ServerTls(TlsFiles(cert, key), check_every_s=0.0)
    server = serve(ROUTER, tls.ssl_context())
    assert request(server.url("/"), context=trusting(pki["ca"]))[0] == 200
    shutil.copy(pki["other-server"].cert, cert)
    shutil.copy(pki["other-server"].key, key)
    assert request(server.url("/"), context=trusting(pki["other-ca"]))[0] == 200
    with pytest.raises(urllib.error.URLError):
        request(server.url("/"), context=trusting(pki["ca"]))

"""TLS, mutual TLS and API keys on a real server, with real certificates (tests/certs.py).

Every front on the gRPC port (headrace.v1.Inference, inference.GRPCInferenceService,
health, reflection) and the metrics endpoint, through raw stubs and through the SDK.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from headrace.client import AsyncClient, Client, HealthStatus, PermissionDenied, Unauthenticated
from headrace.server.auth import Authenticator, key_id
from headrace.server.kserve.pb import grpc_service_pb2 as kpb
from headrace.server.kserve.pb import grpc_service_pb2_grpc as kpb_grpc
from headrace.server.tls import ServerTls, TlsFiles
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pb_grpc

from tests.certs import Pem, issue, make_ca, needs_openssl
from tests.e2e.test_kserve import classify as kserve_classify
from tests.e2e.test_kserve import generate as kserve_generate

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    """Two CAs; a server and a client certificate from each."""
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
        "rogue": issue(other, root / "rogue", "client-b"),
    }


def tls_channel(
    address: str, ca: Pem, client: Pem | None = None, options: list[Any] | None = None
) -> grpc.Channel:
    key, cert = client.pair if client else (None, None)
    creds = grpc.ssl_channel_credentials(ca.cert.read_bytes(), key, cert)
    # a fresh subchannel per channel: each test connection makes its own handshake
    return grpc.secure_channel(address, creds, [("grpc.use_local_subchannel_pool", 1)])


def status_of(call: Callable[[], Any]) -> Code:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


def list_models(channel: grpc.Channel) -> Code:
    stub = pb_grpc.InferenceStub(channel)
    return status_of(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10))


# -- TLS and mutual TLS -----------------------------------------------------------------------


@needs_openssl
def test_plaintext_to_a_tls_port_is_refused(start_server, tiny_models: Path, pki) -> None:
    running = start_server(tiny_models, tls_cert=pki["server"].cert, tls_key=pki["server"].key)
    with grpc.insecure_channel(running.address) as plain:
        assert list_models(plain) == Code.UNAVAILABLE
    with tls_channel(running.address, pki["other-ca"]) as untrusted:
        assert list_models(untrusted) == Code.UNAVAILABLE  # a server this CA did not sign
    with tls_channel(running.address, pki["ca"]) as channel:
        assert list_models(channel) == Code.OK
    with Client(running.address, tls=True, root_certificates=pki["ca"].cert) as client:
        assert client.models()  # the SDK over TLS


@needs_openssl
def test_mutual_tls_wants_a_client_certificate_from_the_ca(
    start_server, tiny_models: Path, pki
) -> None:
    s = pki["server"]
    running = start_server(
        tiny_models, tls_cert=s.cert, tls_key=s.key, tls_client_ca=pki["ca"].cert
    )
    with tls_channel(running.address, pki["ca"]) as anonymous:
        assert list_models(anonymous) == Code.UNAVAILABLE
    with tls_channel(running.address, pki["ca"], pki["rogue"]) as rogue:
        assert list_models(rogue) == Code.UNAVAILABLE  # signed, but by another CA
    with tls_channel(running.address, pki["ca"], pki["client"]) as channel:
        assert list_models(channel) == Code.OK
    c = pki["client"]
    with Client(
        running.address, tls=True, root_certificates=pki["ca"].cert, client_cert=c.cert,
        client_key=c.key,
    ) as client:  # fmt: skip
        assert client.classify("over mutual TLS").results


@needs_openssl
def test_the_models_command_reaches_a_server_over_mutual_tls_with_a_key(
    start_server, tiny_models: Path, pki, tmp_path: Path
) -> None:
    s, c, key = pki["server"], pki["client"], new_key()
    (tmp_path / "keys").write_text(key + "\n")
    running = start_server(
        tiny_models, tls_cert=s.cert, tls_key=s.key, tls_client_ca=pki["ca"].cert,
        api_key_file=tmp_path / "keys",
    )  # fmt: skip
    cli = [sys.executable, "-m", "headrace.server", "models", "--server", running.address]
    mtls = ["--tls-ca", str(pki["ca"].cert), "--tls-cert", str(c.cert), "--tls-key", str(c.key)]

    def models(*args: str, api_key: str = key) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HEADRACE_API_KEY": api_key}
        return subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=60)

    ok = models(*mtls)
    assert ok.returncode == 0, ok.stderr
    assert {line.split()[0] for line in ok.stdout.splitlines()[1:]} == {
        "tiny-classifier", "tiny-generator",
    }  # fmt: skip
    assert models(*mtls, api_key="wrong").returncode == 1  # UNAUTHENTICATED, said on stderr
    assert models("--tls-ca", str(pki["ca"].cert)).returncode == 1  # no client certificate
    assert models().returncode == 1  # plaintext to a TLS port
    bad = models("--tls-cert", str(c.cert))  # a certificate without its key
    assert bad.returncode == 2 and "--tls-key" in bad.stderr
    missing = models("--tls-ca", str(tmp_path / "nope.pem"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


@needs_openssl
def test_certificates_rotate_without_a_restart(
    start_server, tiny_models: Path, pki, tmp_path: Path, capfd
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki["server"].cert, cert)
    shutil.copy(pki["server"].key, key)
    running = start_server(tiny_models, tls_cert=cert, tls_key=key, log_level="info")
    assert running.server.tls is not None
    running.server.tls.check_every_s = 0.0  # look at the files on every handshake
    kept = tls_channel(running.address, pki["ca"])
    assert list_models(kept) == Code.OK

    # A half-done rotation (new certificate, old key) is not taken: the old pair serves on.
    shutil.copy(pki["other-server"].cert, cert)
    with tls_channel(running.address, pki["ca"]) as channel:
        assert list_models(channel) == Code.OK
    shutil.copy(pki["other-server"].key, key)
    with tls_channel(running.address, pki["other-ca"]) as channel:
        assert list_models(channel) == Code.OK  # new connections get the new certificate
    with tls_channel(running.address, pki["ca"]) as channel:
        assert list_models(channel) == Code.UNAVAILABLE
    assert list_models(kept) == Code.OK  # an open connection keeps its session
    kept.close()
    err = capfd.readouterr().err
    assert "tls_reload_failed" in err and "does not match" in err
    assert "tls_reloaded" in err


# -- API keys ---------------------------------------------------------------------------------


def new_key() -> str:
    return "hr_" + secrets.token_hex(16)


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Any]:
    """A key file: one key for every model, one for tiny-classifier only."""
    found = {"any": new_key(), "classifier": new_key(), "path": tmp_path / "keys"}
    found["path"].write_text(
        f"# operators\n{found['any']}\n\n# the shop: classify only\n"
        f"{found['classifier']}  tiny-classifier\n"
    )
    return found


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def every_front(channel: grpc.Channel, metadata: Any) -> dict[str, Code]:
    """One call of each shape on each service that needs a key."""
    native = pb_grpc.InferenceStub(channel)
    kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
    md = {"metadata": metadata, "timeout": 30}
    classify = pb.ClassifyRequest(model="tiny-classifier", texts=["hi"])
    generate = pb.GenerateRequest(model="tiny-generator", prompt="hi", max_new_tokens=2)
    calls: dict[str, Callable[[], Any]] = {
        "Classify": lambda: native.Classify(classify, **md),
        "ClassifyStream": lambda: list(native.ClassifyStream(iter([classify]), **md)),
        "GenerateStream": lambda: list(native.GenerateStream(generate, **md)),
        "ListModels": lambda: native.ListModels(pb.ListModelsRequest(), **md),
        "ModelInfer": lambda: kserve.ModelInfer(kserve_classify("tiny-classifier", ["hi"]), **md),
        "ModelStreamInfer": lambda: list(
            kserve.ModelStreamInfer(
                iter([kserve_generate("tiny-generator", "hi", stream=True, max_tokens=2)]), **md
            )
        ),
        "ServerMetadata": lambda: kserve.ServerMetadata(kpb.ServerMetadataRequest(), **md),
        "ModelReady": lambda: kserve.ModelReady(
            kpb.ModelReadyRequest(name="tiny-classifier"), **md
        ),
    }
    return {name: status_of(call) for name, call in calls.items()}


def test_every_grpc_front_wants_a_valid_key(start_server, tiny_models: Path, keys) -> None:
    running = start_server(tiny_models, api_key_file=keys["path"])
    with grpc.insecure_channel(running.address) as channel:
        for metadata in [None, bearer(new_key()), (("authorization", keys["any"]),)]:
            codes = every_front(channel, metadata)
            assert set(codes.values()) == {Code.UNAUTHENTICATED}, (metadata, codes)
        assert set(every_front(channel, bearer(keys["any"])).values()) == {Code.OK}
        # the refusal says what is needed, never why this one failed
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.InferenceStub(channel).ListModels(
                pb.ListModelsRequest(), metadata=bearer(new_key())
            )
        assert info.value.details() == "a valid API key is required (authorization: Bearer <key>)"


def test_a_scoped_key_reaches_only_its_models(start_server, tiny_models: Path, keys) -> None:
    running = start_server(tiny_models, api_key_file=keys["path"])
    md = bearer(keys["classifier"])
    with grpc.insecure_channel(running.address) as channel:
        native = pb_grpc.InferenceStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert native.Classify(
            pb.ClassifyRequest(model="tiny-classifier", texts=["a"]), metadata=md
        )
        assert native.Classify(pb.ClassifyRequest(texts=["the default model"]), metadata=md)
        listed = native.ListModels(pb.ListModelsRequest(), metadata=md)
        assert [m.name for m in listed.models] == ["tiny-classifier"]
        index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest(), metadata=md)
        assert {m.name for m in index.models} == {"tiny-classifier"}
        generate = pb.GenerateRequest(model="tiny-generator", prompt="hi", max_new_tokens=2)
        refused = {
            "Generate": lambda: native.Generate(generate, metadata=md),
            "GenerateStream": lambda: list(native.GenerateStream(generate, metadata=md)),
            "unknown model": lambda: native.Classify(
                pb.ClassifyRequest(model="no-such", texts=["a"]), metadata=md
            ),  # PERMISSION_DENIED, not NOT_FOUND: a scoped key learns no other names
            "ModelInfer": lambda: kserve.ModelInfer(
                kserve_generate("tiny-generator", "hi", stream=False), metadata=md
            ),
            "ModelMetadata": lambda: kserve.ModelMetadata(
                kpb.ModelMetadataRequest(name="tiny-generator"), metadata=md
            ),
            "ModelReady": lambda: kserve.ModelReady(
                kpb.ModelReadyRequest(name="tiny-generator"), metadata=md
            ),
        }
        codes = {name: status_of(call) for name, call in refused.items()}
        assert set(codes.values()) == {Code.PERMISSION_DENIED}, codes
        # the unscoped key sees and uses everything
        everything = native.ListModels(pb.ListModelsRequest(), metadata=bearer(keys["any"]))
        assert {m.name for m in everything.models} == {"tiny-classifier", "tiny-generator"}
        assert native.Generate(generate, metadata=bearer(keys["any"])).text is not None


def probes(channel: grpc.Channel) -> dict[str, Code]:
    health = health_pb2_grpc.HealthStub(channel)
    kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    return {
        "health": status_of(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10)),
        "ServerLive": status_of(lambda: kserve.ServerLive(kpb.ServerLiveRequest(), timeout=10)),
        "ServerReady": status_of(lambda: kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10)),
        "reflection": status_of(lambda: list(reflection.ServerReflectionInfo(iter([ask])))),
    }


@pytest.mark.parametrize(
    ("exempt", "open_without_key"),
    [
        (None, {"health", "ServerLive", "ServerReady"}),  # the default: health alone
        (("reflection",), {"reflection"}),
        (("health", "reflection"), {"health", "ServerLive", "ServerReady", "reflection"}),
        ((), set()),
    ],
)
def test_health_is_exempt_by_default_and_the_rest_by_config(
    start_server, tiny_models: Path, keys, exempt: tuple[str, ...] | None, open_without_key
) -> None:
    extra = {} if exempt is None else {"auth_exempt": exempt}
    running = start_server(tiny_models, api_key_file=keys["path"], **extra)
    with grpc.insecure_channel(running.address) as channel:
        codes = probes(channel)
    assert {name for name, code in codes.items() if code == Code.OK} == open_without_key
    assert {code for name, code in codes.items() if name not in open_without_key} <= {
        Code.UNAUTHENTICATED
    }


def test_keys_rotate_without_a_restart(start_server, tiny_models: Path, keys, capfd) -> None:
    running = start_server(tiny_models, api_key_file=keys["path"], log_level="info")
    assert running.server.auth is not None
    running.server.auth.check_every_s = 0.0
    with grpc.insecure_channel(running.address) as channel:
        assert list_models_with(channel, keys["any"]) == Code.OK
        fresh = new_key()
        keys["path"].write_text(f"{fresh}\n")
        assert list_models_with(channel, keys["any"]) == Code.UNAUTHENTICATED
        assert list_models_with(channel, fresh) == Code.OK
        keys["path"].write_text("# no key left\n")  # unusable: the keys in use stay
        assert list_models_with(channel, fresh) == Code.OK
    err = capfd.readouterr().err
    assert "api_keys_reloaded" in err and "api_keys_reload_failed" in err


def list_models_with(channel: grpc.Channel, key: str) -> Code:
    stub = pb_grpc.InferenceStub(channel)
    return status_of(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=bearer(key)))


def test_keys_never_reach_the_log(start_server, tiny_models: Path, keys, capfd) -> None:
    running = start_server(tiny_models, api_key_file=keys["path"], log_level="debug")
    assert running.server.auth is not None
    running.server.auth.check_every_s = 0.0
    wrong = new_key()
    with grpc.insecure_channel(running.address) as channel:
        every_front(channel, bearer(keys["any"]))
        every_front(channel, bearer(keys["classifier"]))  # some refused for scope
        every_front(channel, bearer(wrong))
        keys["path"].write_text(keys["path"].read_text() + f"{new_key()} tiny-generator\n")
        assert list_models_with(channel, keys["any"]) == Code.OK
    log = capfd.readouterr().err
    for key in (keys["any"], keys["classifier"], wrong, *keys["path"].read_text().split()):
        if key.startswith("hr_"):
            assert key not in log
    # a log line names a key by its id
    assert f'"key_id":"{key_id(keys["any"])}"' in log.replace(" ", "")
    assert key_id(wrong) in log and key_id(keys["classifier"]) in log
    assert '"auth_denied"' in log.replace(" ", "") and '"api_keys_reloaded"' in log.replace(" ", "")


# -- the SDK ----------------------------------------------------------------------------------


def test_the_sdk_sends_its_api_key(start_server, tiny_models: Path, keys) -> None:
    running = start_server(tiny_models, api_key_file=keys["path"])
    with Client(running.address, api_key=keys["any"]) as client:
        assert client.classify("hello").results
        assert "".join(c.text for c in client.stream("hi", max_new_tokens=2)) is not None
        assert client.health() == HealthStatus.SERVING
    with Client(running.address, api_key=keys["classifier"]) as client:
        with pytest.raises(PermissionDenied):
            client.generate("hi", model="tiny-generator", max_new_tokens=2)
    with Client(running.address) as client, pytest.raises(Unauthenticated):
        client.classify("no key")

    async def main() -> None:
        async with AsyncClient(running.address, api_key=keys["any"]) as client:
            assert (await client.classify("hello")).results
            assert [c async for c in client.stream("hi", max_new_tokens=2)]
        async with AsyncClient(running.address, api_key=new_key()) as client:
            with pytest.raises(Unauthenticated):
                await client.models()

    asyncio.run(main())


# -- the metrics endpoint ---------------------------------------------------------------------


def fetch(url: str, key: str | None = None, context: ssl.SSLContext | None = None) -> int:
    request = urllib.request.Request(url)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            assert b"headrace_" in response.read() or response.status != 200
            return int(response.status)
    except urllib.error.HTTPError as err:
        if err.code == 401:
            assert err.headers["WWW-Authenticate"] == "Bearer"
        return int(err.code)


@pytest.fixture()
def metrics_server() -> Iterator[Callable[..., str]]:
    from headrace.server.metrics import serve_metrics

    started = []

    def start(**kwargs: Any) -> str:
        httpd = serve_metrics(0, **kwargs)
        started.append(httpd)
        scheme = "https" if kwargs.get("ssl_context") else "http"
        return f"{scheme}://localhost:{httpd.server_port}/metrics"

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def test_metrics_want_a_key_unless_exempt(metrics_server, keys) -> None:
    guarded = metrics_server(authenticator=Authenticator(keys["path"]))
    assert fetch(guarded) == 401
    assert fetch(guarded, new_key()) == 401
    assert fetch(guarded, keys["any"]) == 200
    exempt = metrics_server(authenticator=Authenticator(keys["path"], exempt=("metrics",)))
    assert fetch(exempt) == 200


@needs_openssl
def test_metrics_over_mutual_tls(metrics_server, pki) -> None:
    s = pki["server"]
    tls = ServerTls(TlsFiles(s.cert, s.key, pki["ca"].cert))
    url = metrics_server(ssl_context=tls.ssl_context())
    trusting = ssl.create_default_context(cafile=pki["ca"].cert)
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        fetch(url, context=trusting)  # no client certificate
    trusting.load_cert_chain(pki["client"].cert, pki["client"].key)
    assert fetch(url, context=trusting) == 200
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        fetch(url.replace("https:", "http:"))  # plaintext to the TLS port

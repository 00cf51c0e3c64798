"""The HTTP front over raw HTTP/1.1: bad input, disconnects, health, metrics, the page."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import RunningServer, free_port, scrape

GEN = "long-generator"


def request(
    running: RunningServer,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    host, port = running.http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def error_of(running: RunningServer, path: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    status, _, data = request(running, "POST", path, body, **kw)
    return status, json.loads(data)["error"]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def slots(running: RunningServer) -> float | None:
    return scrape(f"{running.http_url}/metrics", "headrace_active_slots", {"model": GEN})


def generated(running: RunningServer) -> float:
    name = "headrace_generation_tokens_total"
    return scrape(f"{running.http_url}/metrics", name, {"model": GEN}) or 0.0


# -- bad input -----------------------------------------------------------------------------------


def test_malformed_bodies_are_400(http_server: RunningServer) -> None:
    for body in (b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"):
        status, err = error_of(http_server, "/v1/completions", body)
        assert status == 400, body
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
        assert "Traceback" not in err["message"]


def test_wrong_types_name_the_parameter(http_server: RunningServer) -> None:
    chat = [{"role": "user", "content": "hi"}]
    cases = [
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
        ("/v1/completions", {"prompt": "x", "stop": ["ok", 3]}, "stop[1]"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {"prompt": "x", "stream_interval": 0}, "stream_interval"),
        ("/v1/completions", {"prompt": "x", "stream_interval": 4097}, "stream_interval"),
        ("/v1/completions", {"prompt": "x", "stream_interval": "8"}, "stream_interval"),
        ("/v1/completions", {"prompt": "x", "stream_interval_ms": -1}, "stream_interval_ms"),
        ("/v1/chat/completions", {"messages": chat, "stream_interval_ms": 10_001}, "stream_interval_ms"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {}, "prompt"),
        ("/v1/completions", {"prompt": "x", "model": 5}, "model"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": ["hi"]}, "messages[0]"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0]"),
        ("/v1/chat/completions", {"messages": chat, "max_completion_tokens": 0}, "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": chat, "tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"messages": chat, "logprobs": True}, "logprobs"),
        ("/v1/classify", {"texts": 3}, "texts"),
        ("/v1/classify", {"texts": ["ok", ""]}, "texts[1]"),
        ("/v1/classify", {"texts": []}, "texts"),
        ("/v1/classify", {"texts": ["ok"], "top_k": -1}, "top_k"),
        ("/v1/classify", {"text": ["ok"]}, "text"),
    ]  # fmt: skip
    for path, body, param in cases:
        status, err = error_of(http_server, path, body)
        assert (status, err["param"]) == (400, param), (body, err)
        assert err["message"]


def test_huge_bodies_are_413(start_server, tiny_models: Path) -> None:
    running = start_server(tiny_models, http_port=free_port(), max_message_mb=1)
    big = json.dumps({"prompt": "x" * (2 * 1024 * 1024)}).encode()
    status, err = error_of(running, "/v1/completions", big)
    assert status == 413 and err["code"] == "body_too_large"
    # no Content-Length: the limit holds while reading a chunked body
    host, port = running.http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
                 encode_chunked=True)  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"
    conn.close()
    ok, _, _ = request(running, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 2})
    assert ok == 200


def test_unknown_route_and_wrong_method(http_server: RunningServer) -> None:
    status, headers, data = request(http_server, "GET", "/v2/nothing")
    assert status == 404 and json.loads(data)["error"]["code"] == "unknown_route"
    status, headers, data = request(http_server, "GET", "/v1/chat/completions")
    assert status == 405 and headers["allow"] == "POST"
    assert "error" in json.loads(data)


def test_request_id_echoed(http_server: RunningServer) -> None:
    body = {"prompt": "the", "max_tokens": 2}
    status, headers, data = request(
        http_server, "POST", "/v1/completions", body, headers={"x-request-id": "req-42"}
    )
    assert status == 200 and headers["x-request-id"] == "req-42"
    assert json.loads(data)["id"] == "cmpl-req-42"
    _, headers, _ = request(http_server, "POST", "/v1/completions", body)
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])


def test_classify(http_server: RunningServer) -> None:
    texts = ["I love this", "this is terrible"]
    status, _, data = request(http_server, "POST", "/v1/classify", {"texts": texts, "top_k": 2})
    assert status == 200
    out = json.loads(data)
    assert out["object"] == "classification" and out["model"] == "tiny-classifier"
    assert [len(r["labels"]) for r in out["results"]] == [2, 2]
    assert out["usage"]["prompt_tokens"] == sum(r["input_tokens"] for r in out["results"])
    one = json.loads(request(http_server, "POST", "/v1/classify", {"texts": "fine"})[2])
    assert sum(label["score"] for label in one["results"][0]["labels"]) == pytest.approx(
        1, abs=1e-5
    )


# -- a client that goes away stops the work -------------------------------------------------------


def _open_stream(running: RunningServer, body: dict[str, Any]) -> socket.socket:
    host, port = running.http_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(data), data)
    )
    return sock


def test_dropped_sse_connection_frees_the_slot(http_server: RunningServer) -> None:
    before = generated(http_server)
    sock = _open_stream(
        http_server,
        {"model": GEN, "prompt": "the", "max_tokens": 400, "stream": True, "ignore_eos": True},
    )
    received = b""
    while b"data: " not in received:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    assert slots(http_server) == 1
    sock.close()
    # The sequence leaves at the next decode step (a step is a few ms here).
    wait_for(lambda: slots(http_server) == 0, timeout=5)
    time.sleep(0.2)
    made = generated(http_server) - before
    assert 0 < made < 300, made  # far fewer than the 400 tokens asked for


def test_dropped_unary_request_frees_the_slot(http_server: RunningServer) -> None:
    before = generated(http_server)
    sock = _open_stream(
        http_server, {"model": GEN, "prompt": "the", "max_tokens": 400, "ignore_eos": True}
    )
    wait_for(lambda: slots(http_server) == 1)
    sock.close()
    wait_for(lambda: slots(http_server) == 0, timeout=5)
    time.sleep(0.2)
    assert generated(http_server) - before < 300


# -- health, metrics, the page -------------------------------------------------------------------


def test_health(http_server: RunningServer) -> None:
    status, _, data = request(http_server, "GET", "/health/live")
    assert status == 200 and json.loads(data) == {"status": "live"}
    status, _, data = request(http_server, "GET", "/health/ready")
    assert status == 200 and json.loads(data)["models"] == ["long-generator", "tiny-classifier"]


def test_metrics_on_the_http_port_unless_set_apart(
    http_server: RunningServer, start_server, tiny_models: Path
) -> None:
    request(http_server, "POST", "/v1/classify", {"texts": ["counted"]})
    url = f"{http_server.http_url}/metrics"
    labels = {"route": "/v1/classify", "model": "tiny-classifier", "status": "200"}
    assert (scrape(url, "headrace_http_requests_total", labels) or 0) >= 1
    assert scrape(url, "headrace_active_slots", {"model": GEN}) == 0
    apart = start_server(tiny_models, http_port=free_port(), metrics_port=free_port())
    assert request(apart, "GET", "/metrics")[0] == 404


def test_chat_page_is_one_offline_file(http_server: RunningServer) -> None:
    status, headers, data = request(http_server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"]
    page = data.decode()
    assert "<script>" in page and "/v1/chat/completions" in page and "/v1/classify" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no CDN, nothing remote
    assert not re.search(r"""(fetch|import)\s*\(\s*["'`]https?:""", page)

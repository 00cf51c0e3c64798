"""The API key check (server/auth.py) in front of an HTTP (ASGI) app: the HTTP front's door.

    app = BearerAuth(router, authenticator)     # 401 + WWW-Authenticate: Bearer without a key

The same check as the gRPC interceptor (server/rpc.py), for HTTP paths:
`/health/...` is the "health" group, `/metrics` the "metrics" group, and
every other path needs a key, except the static chat page at `/` (HTML and
script only: each API call it makes needs a key of its own). The caller found
is set for the request's task, so a handler's `auth.authorize_model(name)`
refuses a key limited to other models (the front maps ModelForbidden to 403).
A refusal is OpenAI's error shape (`code: "invalid_api_key"`), which the
`openai` SDK raises as AuthenticationError; it never says why the key failed.
"""

from __future__ import annotations

from typing import Any

import orjson
from headrace.server import auth
from headrace.server.logs import get_logger

log = get_logger("headrace.http")

Scope = dict[str, Any]
PUBLIC_PATHS = ("/",)  # the chat page: static, holds no data


def http_group(path: str) -> str:
    """ "health", "metrics", "public" (the static page) or "inference" for a request path."""
    if path == "/health" or path.startswith("/health/"):
        return "health"
    if path == "/metrics":
        return "metrics"
    if path in PUBLIC_PATHS:
        return "public"
    return "inference"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:  # ASGI servers lower-case header names
            return bytes(value).decode("latin-1")
    return None


UNAUTHORIZED_BODY = orjson.dumps(
    {
        "error": {
            "message": auth.UNAUTHENTICATED_MESSAGE,
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
)


class BearerAuth:
    """ASGI middleware: `authorization: Bearer KEY` on every non-exempt request."""

    def __init__(self, app: Any, authenticator: auth.Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        group = http_group(path)
        if group == "public" or self.authenticator.is_exempt(group):
            await self.app(scope, receive, send)
            return
        try:
            caller = self.authenticator.authenticate(_header(scope, b"authorization"))
        except auth.Unauthenticated as exc:
            log.warning(
                "auth_denied", front="http", path=path, reason=exc.reason, key_id=exc.key_id
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"www-authenticate", b"Bearer"),
                        (b"content-length", str(len(UNAUTHORIZED_BODY)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})
            return
        with auth.acting_as(caller):
            await self.app(scope, receive, send)

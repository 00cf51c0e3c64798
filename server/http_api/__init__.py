"""The OpenAI-compatible HTTP front: /v1/models, /v1/(chat/)completions (SSE), /v1/classify,
health, metrics and a chat page at /, served by uvicorn on the gRPC server's event loop.

    front.py        HttpFront: uvicorn on the running loop, drain, the route table
    calls.py        what every request shares: ids, body limit, errors, disconnects, log line
    handlers.py     the routes: parse -> engine -> write
    openai_wire.py  OpenAI JSON <-> engine types (the only place that knows the wire format)
    engine.py       the calls into the model repository and server/models.py
    static/         index.html, the chat page (plain JavaScript, nothing fetched from elsewhere)
"""

from headrace.server.http_api.front import HttpFront

__all__ = ["HttpFront"]

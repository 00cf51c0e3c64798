"""Structured logs: one JSON object per line on stderr (or a console renderer).

Every RPC writes one line:

    {"event": "rpc", "rpc": "Generate", "request_id": "...", "model": "tiny-generator",
     "model_version": "1", "code": "OK", "latency_ms": 12.3, "prompt_tokens": 5,
     "completion_tokens": 16, "peer": "ipv4:127.0.0.1:50312", "level": "info",
     "timestamp": "2026-01-01T00:00:00.000000Z"}

orjson serializes when it is installed; the standard json module otherwise.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Stderr:
    """Writes to whatever sys.stderr is at each call (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _json_renderer() -> Any:
    try:
        import orjson
    except ImportError:
        return structlog.processors.JSONRenderer(serializer=json.dumps, default=str)

    def dumps(obj: Any, default: Any = None) -> str:
        return str(orjson.dumps(obj, default=default).decode())

    return structlog.processors.JSONRenderer(serializer=dumps, default=str)


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Route structlog (and the stdlib `logging` of libraries) to stderr."""
    renderer = structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else _json_renderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # Libraries (grpc, asyncio) log through the stdlib: warnings and above to stderr.
    logging.basicConfig(
        level=max(_LEVELS.get(level, logging.INFO), logging.WARNING),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )


def get_logger(name: str = "headrace") -> Any:
    return structlog.get_logger(name)

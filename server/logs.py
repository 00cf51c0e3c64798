"""Structured logs: one JSON object per line on stderr (or a console renderer).

Every RPC writes one line:

    {"event": "rpc", "rpc": "Generate", "request_id": "...", "model": "tiny-generator",
     "model_version": "1", "code": "OK", "latency_ms": 12.3, "prompt_tokens": 5,
     "completion_tokens": 16, "peer": "ipv4:127.0.0.1:50312", "level": "info",
     "timestamp": "2026-01-01T00:00:00.000000Z"}

orjson serializes when it is installed; the standard json module otherwise.

The per-RPC line is on the hot path of every call, so `rpc_line` writes it without
structlog's processor chain when the format is JSON: the same keys and values (the
call's fields, bound context variables, "event", "level", "timestamp"), serialized
once, and the lines of one event-loop turn go to stderr in one write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# A write to a pipe of at most this many bytes is never split by another process's:
# the workers of `--workers N` (and their engine) share one stderr.
PIPE_BUF = 4096


class _Stderr(threading.local):
    """Writes to whatever sys.stderr is at each call (test runners swap it), each line in
    one write: print() writes a line's text and its newline apart, and a piped stderr is
    unbuffered, so two processes' lines would interleave (half a line, then another's)."""

    part = ""  # per thread: the text of a line whose newline has not come yet

    def write(self, text: str) -> int:
        if not text.endswith("\n"):
            self.part += text
            return len(text)
        line, self.part = self.part + text, ""
        sys.stderr.write(line)
        return len(text)

    def flush(self) -> None:
        if self.part:
            sys.stderr.write(self.part)
            self.part = ""
        sys.stderr.flush()


def _dumps() -> Callable[..., str]:
    try:
        import orjson
    except ImportError:
        return json.dumps

    def dumps(obj: Any, default: Any = None) -> str:
        return str(orjson.dumps(obj, default=default).decode())

    return dumps


def _json_renderer() -> Any:
    return structlog.processors.JSONRenderer(serializer=_dumps(), default=str)


class _RpcLines:
    """The fast path of the `rpc` line: JSON at info level (None otherwise: via structlog)."""

    def __init__(self, dumps: Callable[..., str]) -> None:
        self.dumps = dumps
        self.pending: list[str] = []
        self._second = -1
        self._prefix = ""

    def timestamp(self) -> str:
        """Now as structlog's TimeStamper(fmt="iso", utc=True) writes it."""
        now = time.time()
        second = int(now)
        if second != self._second:  # the date and time part changes once a second
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1e6):06d}Z"

    def write(self, fields: dict[str, Any]) -> None:
        context = structlog.contextvars.get_contextvars()
        event = {**context, **fields} if context else fields
        event["event"] = "rpc"
        event["level"] = "info"
        event["timestamp"] = self.timestamp()
        line = self.dumps(event, default=str) + "\n"
        if not self.pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop: write now
                sys.stderr.write(line)
                return
        self.pending.append(line)

    def flush(self) -> None:
        """The turn's lines in as few writes as keep each whole (PIPE_BUF bytes at most)."""
        chunk: list[str] = []
        size = 0
        for line in self.pending:
            n = len(line.encode())
            if chunk and size + n > PIPE_BUF:
                sys.stderr.write("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += n
        self.pending.clear()
        if chunk:
            sys.stderr.write("".join(chunk))


_rpc_lines: _RpcLines | None = None


def rpc_line(log: Any, fields: dict[str, Any]) -> None:
    """Write the one `rpc` line of a call (`log.info("rpc", **fields)`, cheaper)."""
    if _rpc_lines is None:
        log.info("rpc", **fields)
    else:
        _rpc_lines.write(fields)


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Route structlog (and the stdlib `logging` of libraries) to stderr."""
    global _rpc_lines
    json_info = fmt == "json" and _LEVELS.get(level, logging.INFO) <= logging.INFO
    _rpc_lines = _RpcLines(_dumps()) if json_info else None
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

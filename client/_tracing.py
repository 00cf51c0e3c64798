"""W3C trace context for the caller's OpenTelemetry trace, when there is one.

With the opentelemetry API installed and a span current in the calling thread or task,
each call sends `traceparent` (and `tracestate`, `baggage`) through the propagators the
application configured, so the server's spans join the caller's trace. Without the
package, or outside any span, calls go as they are: opentelemetry is optional.
"""

from __future__ import annotations

__all__ = ["with_trace_context"]

Pairs = tuple[tuple[str, str | bytes], ...]

try:  # optional: the SDK needs grpcio and protobuf alone
    from opentelemetry import propagate, trace

    _OTEL = True
except ImportError:  # pragma: no cover - the client without opentelemetry
    _OTEL = False


def with_trace_context(metadata: Pairs | None) -> Pairs | None:
    """`metadata` with the current trace context appended (as it is outside any span)."""
    if not _OTEL or not trace.get_current_span().get_span_context().is_valid:
        return metadata
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return metadata
    return (*(metadata or ()), *carrier.items())

"""The SDK sends the caller's W3C trace context when an OpenTelemetry span is current."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from headrace.client._tracing import with_trace_context
from opentelemetry.sdk.trace import TracerProvider

TRACER = TracerProvider().get_tracer("tests.client")


def test_nothing_added_outside_a_span() -> None:
    pairs = (("x-request-id", "r1"),)
    assert with_trace_context(pairs) is pairs
    assert with_trace_context(None) is None


def test_traceparent_of_the_current_span() -> None:
    with TRACER.start_as_current_span("caller") as span:
        pairs = with_trace_context((("x-request-id", "r1"),))
    ctx = span.get_span_context()
    assert pairs is not None and pairs[0] == ("x-request-id", "r1")
    sent = dict(pairs[1:])
    assert (
        sent["traceparent"]
        == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    )

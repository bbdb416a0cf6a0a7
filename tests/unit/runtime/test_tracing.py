"""Trace context from message headers: what is continued and what is ignored."""

from __future__ import annotations

from opentelemetry import trace

from esbridge.processing.steps import Source, Step
from esbridge.runtime.tracing import header_context, step_span

PARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_valid_traceparent_gives_its_context() -> None:
    ctx = header_context([("esb_nid", b"1"), ("traceparent", PARENT), ("tracestate", b"k=v")])
    assert ctx is not None
    span_context = trace.get_current_span(ctx).get_span_context()
    assert (span_context.trace_id, span_context.span_id) == (
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
    )
    assert span_context.is_remote
    assert span_context.trace_state.get("k") == "v"


def test_missing_or_malformed_traceparent_is_ignored() -> None:
    assert header_context(None) is None
    assert header_context([("esb_nid", b"1")]) is None
    assert header_context([("traceparent", None)]) is None
    assert header_context([("traceparent", b"00-nothex-b7ad6b7169203331-01")]) is None
    assert header_context([("traceparent", b"00-" + b"0" * 32 + b"-b7ad6b7169203331-01")]) is None


def test_an_untraced_step_gets_no_span_and_is_looked_at_once() -> None:
    step = Step(tracking=None, key="k", source=Source("k", b"", headers=[("esb_nid", b"1")]))
    assert step_span(step) is None
    assert step.span is not None  # remembered: the headers are not read again
    assert step_span(step) is None

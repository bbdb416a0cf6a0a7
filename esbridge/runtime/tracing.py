"""OpenTelemetry trace context: captured when events are saved, carried to every consumer.

An event is saved in one process (a command, a webhook, a follower's policy)
and published by the relay later, in another process, so the trace context
cannot travel in memory: it is stored with the events. An application whose
events should carry it is set up with :func:`record_trace_context`: its
recorder then writes the current span's W3C ``traceparent`` and
``tracestate`` into a side table, ``{events table}_trace`` (notification id →
context), in the same transaction as the events. The events table and the
stored events stay exactly as they are, and an application that never
enables it has no side table and no extra write.

The relay publishes the context as W3C ``traceparent``/``tracestate`` Kafka
headers (:mod:`esbridge.relay.reader` reads the side table once per page, only
when it exists); a consumer starts one ``process`` span per event, a child of
the span that saved it (and linked to it, as messaging conventions ask), and
the follower's own new events are saved under that span, so the trace goes on
through the next relay. Outbound HTTP calls carry the context onwards and
webhook intake continues an incoming ``traceparent``.

Only ``opentelemetry-api`` is used (the ``tracing`` extra). Without it, or
without a configured tracer provider, every function here returns at once:
nothing is captured, no span is started. The side table holds the W3C format
whatever propagator the application configures, because the Kafka headers are
W3C; HTTP calls use the application's configured propagator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from esbridge.errors import ConfigurationError

if TYPE_CHECKING:
    from esbridge.processing.steps import Step

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the tracing extra is not installed: everything here is a no-op
    trace = None  # type: ignore[assignment]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: The tracer's (instrumentation scope's) name.
TRACER_NAME = "esbridge"

AVAILABLE = trace is not None
"""True when ``opentelemetry-api`` is installed."""

_W3C: Any = TraceContextTextMapPropagator() if AVAILABLE else None
_NO_SPAN = object()  # Step.span of a step whose message carried no trace context

T = TypeVar("T")

#: (traceparent, tracestate or None) as stored and published.
TraceContext = tuple[str, str | None]


def trace_table_name(events_table_name: str) -> str:
    """The side table of trace contexts beside an application's events table."""
    return f"{events_table_name}_trace"


def require_tracing() -> None:
    """Raise :class:`ConfigurationError` unless ``opentelemetry-api`` is installed."""
    if not AVAILABLE:
        raise ConfigurationError(
            "trace propagation needs OpenTelemetry: pip install 'esbridge[tracing]' "
            "(and configure a tracer provider, e.g. with opentelemetry-sdk)"
        )


def _tracer() -> Any:
    return trace.get_tracer(TRACER_NAME)


def current_trace_context() -> TraceContext | None:
    """The current span's W3C context, or None when there is no valid span (or no OpenTelemetry)."""
    if trace is None:
        return None
    return span_trace_context(trace.get_current_span())


def span_trace_context(span: Any) -> TraceContext | None:
    """``span``'s W3C context (traceparent, tracestate), or None when it is not valid."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    traceparent = carrier.get(TRACEPARENT)
    if traceparent is None:
        return None
    return traceparent, carrier.get(TRACESTATE) or None


def header_context(headers: Sequence[tuple[str, bytes | None]] | None) -> Any | None:
    """The OpenTelemetry context of a message's ``traceparent``/``tracestate`` headers, or None."""
    if trace is None or not headers:
        return None
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name in (TRACEPARENT, TRACESTATE) and value:
            carrier[name] = value.decode("ascii", "replace")
    if TRACEPARENT not in carrier:
        return None
    ctx = _W3C.extract(carrier)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None  # a malformed traceparent: W3C says ignore it
    return ctx


def step_span(step: Step) -> Any | None:
    """The ``process`` span of a consumed event (started on first use), or None when untraced.

    A child of the span that saved the event (its message's ``traceparent``),
    linked to it too. Ended by :func:`end_step_spans` once its batch is
    recorded (a batch that failed runs again with the same steps and spans),
    so one span covers an outbound call made before the batch's transaction
    and the policy that records its outcome.
    """
    span = step.span
    if span is None:
        span = _NO_SPAN
        source = step.source
        ctx = header_context(getattr(source, "headers", None))
        if ctx is not None:
            destination = getattr(source, "kafka_topic", None) or "notification log"
            producer = trace.get_current_span(ctx).get_span_context()
            attributes: dict[str, Any] = {"messaging.operation.type": "process"}
            if getattr(source, "kafka_topic", None) is not None:
                attributes["messaging.system"] = "kafka"
                attributes["messaging.destination.name"] = destination
                attributes["messaging.destination.partition.id"] = str(source.kafka_partition)
                attributes["messaging.kafka.offset"] = source.kafka_offset
            if getattr(source, "nid", None) is not None:
                attributes["esbridge.notification_id"] = source.nid
            if getattr(source, "event_topic", None):
                attributes["esbridge.event_topic"] = source.event_topic
            span = _tracer().start_span(
                f"process {destination}",
                context=ctx,
                kind=SpanKind.CONSUMER,
                links=[Link(producer)],
                attributes=attributes,
            )
        step.span = span
    return None if span is _NO_SPAN else span


@contextmanager
def processing(step: Step) -> Iterator[None]:
    """Inside, the current span is ``step``'s processing span (when its message was traced)."""
    span = step_span(step) if AVAILABLE else None
    if span is None:
        yield
        return
    with trace.use_span(span, end_on_exit=False, record_exception=False):
        yield


def call_in_span(span: Any, func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` with ``span`` current (not ended after: see :func:`step_span`)."""
    with trace.use_span(span, end_on_exit=False, record_exception=False):
        return func(*args)


def note_step_failure(step: Step, error: BaseException) -> None:
    """Record on ``step``'s span that its policy raised ``error`` (the span goes on)."""
    span = step.span
    if span is not None and span is not _NO_SPAN and span.is_recording():
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def end_step_spans(steps: Sequence[Step]) -> None:
    """End the processing spans of ``steps``: their batch is recorded (or given up)."""
    if not AVAILABLE:
        return
    for step in steps:
        span = step.span
        if span is not None and span is not _NO_SPAN and span.is_recording():
            span.end()


@contextmanager
def client_span(method: str, url: str, headers: MutableMapping[str, str]) -> Iterator[Any]:
    """A CLIENT span around one outbound HTTP attempt; its context is injected into ``headers``.

    Only inside a trace (a current span, e.g. the event's processing span): a
    call for an untraced event starts no trace of its own, no orphan span.
    Yields the span (None when there is none) so the caller can set the status code.
    """
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        yield None
        return
    with _tracer().start_as_current_span(
        method,
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": method, "url.full": url},
    ) as span:
        propagate.inject(headers)
        yield span


@contextmanager
def server_span(name: str, headers: Mapping[str, str]) -> Iterator[None]:
    """A SERVER span continuing the request's ``traceparent`` (a new trace without one)."""
    if trace is None:
        yield
        return
    ctx = propagate.extract(headers)
    with _tracer().start_as_current_span(name, context=ctx, kind=SpanKind.SERVER):
        yield

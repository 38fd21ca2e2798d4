"""Traces: OpenTelemetry spans of each call, HTTP request and store query; none unless
configured.

With TASKNODE_TRACES_EXPORTER=none (the default) this process has no tracer: the call
path reads one module attribute and makes no span object at all. Otherwise each
serving process (each worker, once started: spans leave through a thread of the
process that made them) has an SDK TracerProvider of its own, with its sampler and
exporter, and records:

- a server span per gRPC call, named by its method, and per HTTP request, named by its
  method and route, continuing the W3C traceparent the caller sent (gRPC metadata, HTTP
  header);
- the shim's call to the service carries the HTTP span as its traceparent metadata, in
  process and over a channel alike, so the call's span is the request's child;
- a client span per store query ("store NAME"), under a span that records only, so a
  call that is not sampled pays nothing for its queries. Its attributes name the query
  and the database system: no SQL, no parameter, no credential.

The sampler is parent-based: a call whose caller sent a traceparent follows the caller's
sampled flag; any other call is sampled with the probability traces_sample_ratio. Ratio
0 ("sampling off") records only what callers sampled, and the other calls make no span
at all (tracer_for), so that it costs what tracing off costs.

The provider is this module's, not OpenTelemetry's global one: nothing else in the
process traces, and tests set it up and take it down again (configure, shutdown).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan
from opentelemetry.trace import Span
from opentelemetry.trace import SpanContext
from opentelemetry.trace import SpanKind
from opentelemetry.trace import Status
from opentelemetry.trace import StatusCode
from opentelemetry.trace import TraceFlags
from opentelemetry.trace import Tracer

from server.config import Config

EXPORTERS = ("none", "console", "otlp")
#: The service name spans carry unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) says.
DEFAULT_SERVICE_NAME = "tasknode"
#: A traceparent longer than this is no traceparent: a tracing header never breaks a
#: request, nor makes a log line (W3C Trace Context: restart the trace).
MAX_TRACEPARENT = 256
#: W3C Trace Context's traceparent: version, trace id, parent id, flags, and (for versions
#: after 00) more fields. OpenTelemetry's own propagator reads it with the same rules.
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x20-\x7e]*)?"
)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True)
class _Tracing:
    provider: TracerProvider
    tracer: Tracer
    #: Sampling off: calls no caller sampled make no span (see tracer_for).
    sampling_off: bool


#: This process's tracing; None: off.
_current: _Tracing | None = None


def check(config: Config) -> None:
    """SystemExit naming the setting for an exporter this module does not know or a ratio
    outside [0, 1]: a bad setting stops the start, before anything is served."""
    if config.traces_exporter not in EXPORTERS:
        raise SystemExit(
            f"TASKNODE_TRACES_EXPORTER: {config.traces_exporter!r} is not one of "
            f"{', '.join(EXPORTERS)}"
        )
    if not 0 <= config.traces_sample_ratio <= 1:
        raise SystemExit(
            f"TASKNODE_TRACES_SAMPLE_RATIO: {config.traces_sample_ratio!r} is not between 0 and 1"
        )


def configure(config: Config, exporter: SpanExporter | None = None) -> None:
    """Set this process's tracing up as config says (see check), shutting down any
    earlier setup. A serving process calls it once it runs: a worker process after it
    started, since the SDK's export thread does not outlive a fork.

    exporter (tests): spans go there, each as it ends, whatever config's exporter is."""
    global _current
    check(config)
    shutdown()
    if exporter is None and config.traces_exporter == "none":
        return
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.traces_sample_ratio)),
        resource=_resource(),
        shutdown_on_exit=False,  # shutdown() flushes; serving processes end with os._exit
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_exporter(config.traces_exporter)))
    _current = _Tracing(provider, provider.get_tracer("tasknode"), config.traces_sample_ratio == 0)


def _resource() -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, with service.name "tasknode"
    when neither names the service."""
    detected = Resource.create()
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return detected


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    # Imported here: only a process that exports over OTLP loads its gRPC client.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, HEADERS, ...


def shutdown() -> None:
    """Export what is still batched and stop tracing in this process (no-op when off)."""
    global _current
    if _current is not None:
        tracing, _current = _current, None
        tracing.provider.shutdown()


def tracer() -> Tracer | None:
    """This process's tracer; None when tracing is off."""
    return _current.tracer if _current is not None else None


def tracer_for(traceparent: str | None) -> Tracer | None:
    """The tracer a call continuing traceparent (None: none) makes its span with; None
    when it makes none: tracing is off, or sampling is off and no caller sampled the
    call's trace. The SDK would then make a span that records nothing (its sampler is
    parent-based, ratio 0) and whose children record nothing: ~10-25 µs of a call for
    nothing, so none is made. Logs and envelopes show the caller's trace id, as with
    tracing off."""
    tracing = _current
    if tracing is None:
        return None
    if tracing.sampling_off:
        found = _parsed(traceparent)
        if found is None or not int(found[2], 16) & TraceFlags.SAMPLED:
            return None
    return tracing.tracer


def _parsed(traceparent: str | None) -> tuple[str, str, str] | None:
    """The trace id, parent id and flags of a valid W3C traceparent; None otherwise."""
    if not traceparent or len(traceparent) > MAX_TRACEPARENT:
        return None
    match = _TRACEPARENT.fullmatch(traceparent.rstrip(" \t"))
    if match is None:
        return None
    version, trace_id, span_id, flags, more = match.groups()
    if version == "ff" or (version == "00" and more):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, flags


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) of a valid W3C traceparent; None otherwise."""
    found = _parsed(traceparent)
    return found[0] if found is not None else None


def parent(traceparent: str | None) -> Context | None:
    """The caller's span, from its traceparent, as the parent of ours; None for none or
    one that is not valid (a new trace starts). tracestate is not carried on."""
    found = _parsed(traceparent)
    if found is None:
        return None
    trace_id, span_id, flags = found
    caller = SpanContext(int(trace_id, 16), int(span_id, 16), True, TraceFlags(int(flags, 16)))
    return trace.set_span_in_context(NonRecordingSpan(caller))


def id_of(span: Span) -> str:
    """span's trace id as 32 hex digits: what logs and the legacy envelope show."""
    return format(span.get_span_context().trace_id, "032x")


def outgoing(received: str | None, trace_id: str) -> str | None:
    """The traceparent a call the shim makes for a request carries: the request's span
    when it has one. Else, when the caller sent a valid traceparent, that one as it came;
    when it sent none, tracing on (sampling off): trace_id (the request's fresh one),
    not sampled, as the SDK's span that records nothing would carry it; tracing off:
    none (a shim that does not trace must not tell the server what to sample)."""
    if _current is not None:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    if received and _parsed(received) is not None:
        return received.strip(" \t")
    if _current is not None:
        return f"00-{trace_id}-{secrets.token_hex(8)}-00"
    return None


def current_trace_id() -> str | None:
    """The trace id of the span current in this thread or task, if tracing; else None."""
    if _current is None:
        return None
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def server_span(tracer: Tracer, name: str, traceparent: str | None, **attributes: Any) -> Any:
    """A server span named name, the caller's (from traceparent) child, made current for
    the with block it is used in. Errors are set on it by the caller (failed), not from
    exceptions: an aborted gRPC call raises, and is no error of the server's."""
    return tracer.start_as_current_span(
        name,
        context=parent(traceparent),
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


def failed(span: Span, description: str) -> None:
    """Mark span as failed, saying why in a word (an error's reason, never its text)."""
    span.set_status(Status(StatusCode.ERROR, description))


def query_span(name: str, system: str) -> Span | None:
    """A client span for the store query name, child of the current span, or None when
    that span is not recorded (tracing off, or the call not sampled). The caller ends it."""
    if _current is None or not trace.get_current_span().is_recording():
        return None
    return _current.tracer.start_span(
        f"store {name}",
        kind=SpanKind.CLIENT,
        attributes={"db.system.name": system, "tasknode.store.query": name},
    )

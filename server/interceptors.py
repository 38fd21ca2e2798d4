"""The interceptors every TaskNodeService call passes through, outermost first.

ServiceInterceptor owns, in one place: parsing the request's bytes (bytes that are
no request are the caller's error, not grpcio's INTERNAL), the deadline check, one
store session (database connection) per call, turning domain errors into rich gRPC
statuses (code, ErrorInfo, BadRequest, bounded in size), the one catch-all that
keeps stray exceptions from reaching callers as UNKNOWN, and the access log line
(with the app and user), and the call's metrics beside it (server.metrics); when
tracing, the call's server span around all of it (server.traces).

AuthInterceptor checks the caller's credentials and makes the Principal current.
Health and reflection pass through both, open to all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status
from opentelemetry.trace import Span

from server import errors
from server import metrics
from server import traces
from server.access import AccessLog
from server.auth import Authenticator
from server.auth import current_principal
from server.db.nodestore import NodeStore
from server.db.store import NodeLost

errlog = logging.getLogger(__name__)

#: Calls to these services get the treatment; health and reflection pass through.
SERVICE_PREFIX = "/bksops.tasknode."
#: The errors that refuse a call before it is served, counted by reason in
#: tasknode_refused_calls_total: authentication failures and throttled credential checks.
REFUSALS = (errors.Unauthenticated, errors.CredentialChecksThrottled)
#: Times a call is served anew after the database node it read from failed (NodeLost):
#: one while one node dies at a time, and one more for a node the retry itself finds dead.
NODE_LOST_RETRIES = 2


def to_status(exc: errors.ServiceError) -> grpc.Status:
    """The gRPC status for a domain error: its code, message, ErrorInfo and BadRequest,
    each within the bounds of server.errors, however many bad fields the request had."""
    return rpc_status.to_status(rich_status(exc))


def rich_status(exc: errors.ServiceError) -> status_pb2.Status:
    """The google.rpc.Status of to_status itself: what a call failing with exc sends in
    its trailers, and what a batch item failing with exc holds."""
    metadata = {
        key: errors.clip(value, errors.MAX_TEXT_BYTES) for key, value in exc.metadata.items()
    }
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=errors.DOMAIN, metadata=metadata)
    details = [_pack(info)]
    if exc.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in errors.bounded_violations(exc.violations)
                    ]
                )
            )
        )
    message = errors.clip(exc.message, errors.MAX_MESSAGE_BYTES)
    return status_pb2.Status(code=exc.code.value[0], message=message, details=details)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


Behaviour = Callable[[Any, grpc.ServicerContext], Any]
#: A method's request deserializer: the request message in its bytes.
Parse = Callable[[bytes], Any]


class HandlerRewriter(grpc.ServerInterceptor):
    """Replaces the handlers of the calls _picks chooses with what _rewrite builds of them.

    grpcio asks for the handler on the thread that takes in every call, before the
    call is admitted or refused, so a rewritten handler is built once per method and
    handler (the ones grpcio registered never change) and reused.
    """

    def __init__(self) -> None:
        self._built: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not self._picks(handler, method):
            return handler
        known = self._built.get(method)
        if known is None or known[0] is not handler:
            known = (handler, self._rewrite(handler, method))
            self._built[method] = known
        return known[1]

    def _picks(self, handler: grpc.RpcMethodHandler, method: str) -> bool:
        raise NotImplementedError

    def _rewrite(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class _ServiceCallInterceptor(HandlerRewriter):
    """Wraps the unary behaviour of our services' handlers with _wrap; health and
    reflection handlers pass through untouched."""

    def _picks(self, handler: grpc.RpcMethodHandler, method: str) -> bool:
        return handler.unary_unary is not None and method.startswith(SERVICE_PREFIX)

    def _rewrite(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        assert handler.unary_unary is not None  # _picks chose only unary methods
        return self._wrapped_handler(handler, handler.unary_unary, method)

    def _wrapped_handler(
        self, handler: grpc.RpcMethodHandler, behaviour: Behaviour, method: str
    ) -> grpc.RpcMethodHandler:
        """handler, its (unary) behaviour wrapped with _wrap."""
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(behaviour, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, inner: Behaviour, method: str) -> Behaviour:
        raise NotImplementedError


def _ids(context: grpc.ServicerContext) -> tuple[str, str | None]:
    """The call's request id (the shim's, for a call it makes; "-" for none) and the
    caller's traceparent (None for none)."""
    request_id, traceparent = "-", None
    for key, value in context.invocation_metadata() or ():
        if key == "x-bkapi-request-id" and isinstance(value, str):
            request_id = value[:64]
        elif key == "traceparent" and isinstance(value, str):
            traceparent = value
    return request_id, traceparent


#: The codes that are the server's failure, not the caller's: a span ending with one is
#: an error (OpenTelemetry's semantic conventions for gRPC servers).
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class ServiceInterceptor(_ServiceCallInterceptor):
    """Wraps each unary TaskNodeService handler; see the module docstring."""

    def __init__(self, store: NodeStore, access: AccessLog) -> None:
        super().__init__()
        self.store = store
        self.access = access

    def _wrapped_handler(
        self, handler: grpc.RpcMethodHandler, behaviour: Behaviour, method: str
    ) -> grpc.RpcMethodHandler:
        """handler, taking the request's bytes, which the call parses itself: grpcio
        would answer bytes that are not a request INTERNAL, with a traceback in the log
        and no access line, before any interceptor runs. (In-process callers hand over
        the message itself, which passes as it is.)"""
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(behaviour, method, handler.request_deserializer),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, inner: Behaviour, method: str, parse: Parse | None = None) -> Behaviour:
        measured = metrics.MethodMetrics(method)
        in_flight = measured.in_flight
        service, _, name = method[1:].partition("/")

        def served(
            request: Any,
            context: grpc.ServicerContext,
            request_id: str,
            trace_id: str,
            span: Span | None,
        ) -> Any:
            started = time.perf_counter()
            in_flight.inc()
            outcome = "OK"
            code = grpc.StatusCode.OK
            # Refused callers have no principal; the app code they claimed still names them.
            claimed = "-"
            reset = current_principal.set(None)
            try:
                return self._run(inner, request, context, parse)
            except errors.ServiceError as exc:
                code = exc.code
                outcome = f"{code.name}/{exc.reason}"
                claimed = exc.metadata.get("appCode", "")[:64] or "-"
                if isinstance(exc, REFUSALS):
                    metrics.refused(exc.reason)
                if span is not None and code in SERVER_FAULTS:
                    traces.failed(span, exc.reason)
                context.abort_with_status(to_status(exc))
            finally:
                seconds = time.perf_counter() - started
                principal = current_principal.get()
                self.access.record(
                    context.peer(),
                    method,
                    principal.app_code if principal else claimed,
                    principal.username if principal else "-",
                    outcome,
                    seconds * 1000,
                    request_id,
                    trace_id,
                )
                current_principal.reset(reset)
                in_flight.dec()
                measured.handled(code.name).inc()
                measured.seconds.observe(seconds)
                if span is not None:
                    span.set_attribute("rpc.grpc.status_code", code.value[0])

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            request_id, traceparent = _ids(context)
            tracer = traces.tracer_for(traceparent)
            if tracer is None:  # no span object at all
                trace_id = traces.trace_id_of(traceparent) or "-"
                return served(request, context, request_id, trace_id, None)
            with traces.server_span(
                tracer,
                method[1:],
                traceparent,
                **{"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            ) as span:
                return served(request, context, request_id, traces.id_of(span), span)

        return call

    def _run(
        self, inner: Behaviour, request: Any, context: grpc.ServicerContext, parse: Parse | None
    ) -> Any:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise errors.DeadlineExceeded("the call's deadline passed before it was served")
        try:
            if parse is not None and isinstance(request, bytes):
                request = _parsed(request, parse)
            for served in range(NODE_LOST_RETRIES + 1):
                try:
                    with self.store.session(remaining):
                        return inner(request, context)
                except NodeLost as lost:
                    # The call only read, from a node now set aside: serve it anew on
                    # another, while its deadline allows.
                    remaining = context.time_remaining()
                    if served == NODE_LOST_RETRIES or (remaining is not None and remaining <= 0):
                        raise lost.error from lost
            raise AssertionError("unreachable: the last try returns or raises")
        except errors.ServiceError:
            raise
        except Exception as exc:
            errlog.exception("unexpected error serving a call")
            raise errors.Internal("internal error; the server log has the details") from exc


def _parsed(data: bytes, parse: Parse) -> Any:
    """The request message in data; MalformedRequest, the caller's error, if it holds none."""
    try:
        return parse(data)
    except DecodeError as exc:
        # protobuf's words name the message type and what is wrong, never the bytes.
        raise errors.MalformedRequest(
            f"the request is not a valid protobuf message: {exc}"
        ) from None


class AuthInterceptor(_ServiceCallInterceptor):
    """Checks x-bkapi-authorization on every TaskNodeService call; see server.auth."""

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self.authenticator = authenticator

    def _wrap(self, inner: Behaviour, method: str) -> Behaviour:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            metadata = context.invocation_metadata()
            # No reset here: ServiceInterceptor, outside, resets it after its access log.
            current_principal.set(self.authenticator.authenticate(metadata, context.peer()))
            return inner(request, context)

        return call

"""The ASGI application: route, call the RPC, render; no exception ever reaches the server.

A raw ASGI app rather than a framework: it needs routing by template, one body
reader and one error boundary, and uvicorn with a bare ASGI app measured fastest
(perf-baseline.md: ~50k req/s against Starlette's 30k and aiohttp's 27k).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from google.protobuf.message import Message
from google.rpc import status_pb2

from server import errors
from server import metrics
from server import traces
from server.access import AccessLog
from server.auth import Credentials
from server.config import Config
from server.gateway import canonical
from server.gateway import credentials as creds
from server.gateway import legacy
from server.gateway import statuses
from server.gateway.client import Backend
from server.gateway.client import Caller
from server.gateway.client import CallFailed
from server.gateway.credentials import Authenticate
from server.gateway.credentials import accept_everyone
from server.gateway.rendered import RenderedCache
from server.gateway.requests import Disconnected
from server.gateway.requests import Request
from server.gateway.requests import receive_body
from server.gateway.routes import APIGW
from server.gateway.routes import CANONICAL
from server.gateway.routes import Kind
from server.gateway.routes import Route
from server.gateway.routes import Router
from server.gateway.routes import canonical_routes
from server.gateway.routes import legacy_routes
from server.tls import channel_credentials

log = logging.getLogger("tasknode.access.http")
#: Memory for legacy JSON already rendered (server.gateway.rendered).
RENDERED_CACHE_BYTES = 32 * 1024 * 1024
#: One line per request: client, method, path, status, milliseconds, request id.
HTTP_LINE = "http {stamp} {0} {1} {2} {3} {4:.1f}ms {5}"
#: The keys of HTTP_LINE's fields in a JSON line; the trace id is a JSON field only.
HTTP_KEYS = ("peer", "method", "path", "status", "duration_ms", "request_id", "trace_id")
errlog = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = tuple[tuple[bytes, bytes], ...]

INTERNAL = "internal error; the server log has the details"
#: What bytes that are not an HTTP request get.
NOT_HTTP = "the request is not valid HTTP/1.1"


@dataclass(frozen=True)
class Response:
    """What the app sends: status, body and headers (ASGI's byte pairs)."""

    status: int
    body: bytes
    headers: Headers


@dataclass(frozen=True)
class Streamed:
    """A response whose body is sent piece by piece as chunks yields them (a watch)."""

    status: int
    headers: Headers
    chunks: AsyncIterator[bytes]


#: The longest ?wait= of a long-poll GET, in seconds.
MAX_WAIT_SECONDS = 300.0
SSE = "text/event-stream"
_WATCH_NODE = pb.DESCRIPTOR.services_by_name["TaskNodeService"].methods_by_name["WatchTaskNode"]


class App:
    """The HTTP/JSON shim: the legacy routes and the HttpRule routes, calling the service
    at target (a gRPC address) or through a Caller (server.gateway.local in-process).

    authenticate is the seam for the shim's own checks of the caller (see credentials.py).
    """

    def __init__(
        self,
        config: Config,
        target: str | Caller,
        authenticate: Authenticate = accept_everyone,
        watch_target: str = "",
    ) -> None:
        self.backend: Caller = (
            Backend(target, channel_credentials(config), tls_name=config.grpc_target_tls_name)
            if isinstance(target, str)
            else target
        )
        self.router = Router([*legacy_routes(config.gateway_prefix), *canonical_routes()])
        self.zone = ZoneInfo(config.time_zone)
        self.max_body_bytes = config.max_body_bytes
        self.authenticate = authenticate
        self.access = AccessLog(HTTP_LINE, HTTP_KEYS, log)
        self.rendered = RenderedCache(RENDERED_CACHE_BYTES)
        #: The watch streams' server (server.watch), called over gRPC whatever target is.
        self.watch = Backend(
            loopback(watch_target or config.watch_listen()),
            channel_credentials(config),
            connections=1,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request = Request.from_scope(scope)
        traceparent = request.headers.get("traceparent")
        tracer = traces.tracer_for(traceparent)
        if tracer is None:  # no span object at all
            await self._answer(request, receive, send, started)
            return
        with traces.server_span(
            tracer,
            request.method,
            traceparent,
            **{"http.request.method": request.method},
        ) as span:
            request.trace_id = traces.id_of(span)
            status = await self._answer(request, receive, send, started)
            if request.route != "none":
                span.update_name(f"{request.method} {request.route}")
                span.set_attribute("http.route", request.route)
            if status is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    traces.failed(span, str(status))

    async def _answer(
        self, request: Request, receive: Receive, send: Send, started: float
    ) -> int | None:
        """Answer request, log it and count it: its status, or None if the client left."""
        metrics.HTTP_IN_FLIGHT.inc()
        try:
            response = await self._respond(request, receive)
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response.headers,
                }
            )
            if isinstance(response, Streamed):
                await _stream_body(response.chunks, receive, send)
            else:
                await send({"type": "http.response.body", "body": response.body})
        except Disconnected:
            return None
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
        seconds = time.perf_counter() - started
        self.access.record(
            request.client,
            request.method,
            request.path[:200],
            response.status,
            seconds * 1000,
            request.request_id,
            request.trace_id,
        )
        # The route's template, never the path: one series per route, whatever is asked.
        metrics.http_answered(request.method, request.route, response.status, seconds)
        return response.status

    async def _respond(self, request: Request, receive: Receive) -> Response | Streamed:
        kind = self.router.kind_for(request.path)
        extra: Headers = ()
        try:
            route, request.path_vars = self.router.match(request.method, request.path)
            kind = route.kind
            request.route = route.template.text
            request.body = await receive_body(
                receive, self.max_body_bytes, request.headers.get("content-length")
            )
            if kind == CANONICAL:
                return await self._canonical(route, request)
            return await self._legacy(route, request)
        except errors.ServiceError as exc:
            status = statuses.status_of(exc)
            if isinstance(exc, errors.MethodNotAllowed):
                extra = ((b"allow", exc.metadata["allow"].encode("ascii")),)
        except CallFailed as exc:
            status = exc.status
        except Disconnected:
            raise
        except Exception:
            errlog.exception("unexpected error answering %s %s", request.method, request.path[:200])
            status = statuses.status_of(errors.Internal(INTERNAL))
        return _failure(kind, status, request, extra)

    async def _legacy(self, route: Route, request: Request) -> Response:
        """The reply in the legacy envelope, with the node's etag as ETag, or only that
        (304, no body) to a GET whose If-None-Match names it: callers that send none see
        the envelope they always did."""
        params = legacy.read_params(request)
        credentials = creds.read_credentials(request.headers.get(creds.HEADER), params)
        await self.authenticate(credentials)
        message = legacy.build_request(params)
        reply = await self._call(route, message, credentials, request, raw=True)
        named = bool(message.component_code)
        rendered = self.rendered.get(reply, named)
        if rendered is None:
            detail = pb.NodeDetail.FromString(reply)
            rendered = (dumps(legacy.render_detail(detail, named, self.zone)), detail.etag)
            self.rendered.put(reply, named, rendered)
        data, etag = rendered
        return _tagged(request, etag) or _json(
            200, legacy.success_body(data, request), request, _etag_header(etag)
        )

    async def _canonical(self, route: Route, request: Request) -> Response | Streamed:
        """The reply in proto JSON; with its etag (if it has one) as ETag, or only that
        (304, no body) to a GET whose If-None-Match names it. A watch streams its
        messages; a GET of a node with ?wait= long-polls (see _long_poll)."""
        credentials = creds.read_credentials(request.headers.get(creds.HEADER), {})
        await self.authenticate(credentials)
        message = canonical.build_request(route, request)
        if route.rpc.server_streaming:
            return await self._watch(route, message, credentials, request)
        wait = _wait_seconds(request)
        if wait is not None and isinstance(message, pb.GetTaskNodeDetailRequest):
            return await self._long_poll(message, wait, credentials, request)
        reply = await self._call(route, message, credentials, request)
        etag = canonical.etag_of(reply)
        return _tagged(request, etag) or _json(
            200, canonical.reply_json(reply, message), request, _etag_header(etag)
        )

    async def _watch(
        self, route: Route, message: Message, credentials: Credentials, request: Request
    ) -> Streamed:
        """The stream as newline-delimited JSON, each line {"result": message} and a last
        {"error": status} if it fails, as grpc-gateway streams; or as Server-Sent Events
        (each message's resume token its id, a failure an "error" event) when the client
        accepts text/event-stream, whose Last-Event-ID then resumes. A failure before the
        first message is an ordinary error response. A Grpc-Timeout header (grpc-gateway's:
        "30S", "500m") is the stream's deadline."""
        events = SSE in request.headers.get("accept", "")
        last_event = request.headers.get("last-event-id", "")
        if events and last_event and not getattr(message, "resume_token", "x"):
            message.resume_token = last_event  # type: ignore[attr-defined]
        metadata = [*creds.metadata(credentials), ("x-bkapi-request-id", request.request_id)]
        timeout = _grpc_timeout(request.headers.get("grpc-timeout"))
        messages = self.watch.stream(route.rpc, message, metadata, timeout)
        first = await anext(messages)  # CallFailed here: an error response
        kind = b"text/event-stream" if events else b"application/x-ndjson"
        headers = ((b"content-type", kind), (b"cache-control", b"no-store"), *_ids(request))
        return Streamed(200, headers, _watch_body(first, messages, events))

    async def _long_poll(
        self,
        message: pb.GetTaskNodeDetailRequest,
        wait: float,
        credentials: Credentials,
        request: Request,
    ) -> Response:
        """GetTaskNodeDetail that waits, up to wait seconds, for the node's etag to differ
        from the version the caller has (?version=, or If-None-Match): the changed detail
        as soon as there is one, else at the end of the wait the unchanged detail (or 304,
        for If-None-Match). Served by a WatchTaskNode stream, so it costs the store no
        more than a stream does."""
        metadata = [*creds.metadata(credentials), ("x-bkapi-request-id", request.request_id)]
        messages = self.watch.stream(_WATCH_NODE, pb.WatchTaskNodeRequest(node=message), metadata)
        try:
            detail = (await anext(messages)).detail
            have = _query_value(request, "version") or request.headers.get("if-none-match", "")
            if have and _same_version(have, detail.etag):
                try:
                    async with asyncio.timeout(wait):
                        async for update in messages:
                            if update.HasField("detail"):
                                detail = update.detail
                                break
                except TimeoutError:
                    pass
        finally:
            await messages.aclose()
        return _tagged(request, detail.etag) or _json(
            200, canonical.reply_json(detail, message), request, _etag_header(detail.etag)
        )

    async def _call(
        self,
        route: Route,
        message: Message,
        credentials: Credentials,
        request: Request,
        raw: bool = False,
    ) -> Any:
        metadata = [*creds.metadata(credentials), ("x-bkapi-request-id", request.request_id)]
        traceparent = traces.outgoing(request.headers.get("traceparent"), request.trace_id)
        if traceparent is not None:
            metadata.append(("traceparent", traceparent))
        return await self.backend.call(route.rpc, message, metadata, raw, request.peer)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.backend.close()
                await self.watch.close()
                self.access.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _stream_body(chunks: AsyncIterator[bytes], receive: Receive, send: Send) -> None:
    """Send chunks as they come, until they end or the client leaves (which ends them)."""

    async def pump() -> None:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    tasks = {asyncio.create_task(pump()), asyncio.create_task(gone())}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _watch_body(
    first: Message, rest: AsyncGenerator[Message, None], events: bool
) -> AsyncIterator[bytes]:
    """A watch's messages as NDJSON lines, or as Server-Sent Events."""
    message: Message | None = first
    try:
        while message is not None:
            data = dumps(canonical.reply_json(message))
            if events:
                token = str(getattr(message, "resume_token", ""))
                yield b"id: " + token.encode("ascii") + b"\ndata: " + data + b"\n\n"
            else:
                yield b'{"result":' + data + b"}\n"
            message = await anext(rest, None)
    except CallFailed as exc:
        failure = dumps(canonical.status_json(exc.status))
        yield (
            (b"event: error\ndata: " + failure + b"\n\n")
            if events
            else (b'{"error":' + failure + b"}\n")
        )
    finally:
        await rest.aclose()


#: grpc-timeout units (the gRPC HTTP/2 protocol's), in seconds.
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _grpc_timeout(text: str | None) -> float | None:
    """A Grpc-Timeout header ("2S") in seconds; None if absent; InvalidArgument if malformed."""
    if text is None:
        return None
    digits, unit = text[:-1], text[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        raise errors.InvalidArgument(
            f"Grpc-Timeout must be digits and a unit (H, M, S, m, u, n), not {text[:20]!r}",
            {"fields": "grpc-timeout"},
        )
    return int(digits) * _TIMEOUT_UNITS[unit]


def _wait_seconds(request: Request) -> float | None:
    """The ?wait= of a long-poll ("30" or "30s"), at most MAX_WAIT_SECONDS; None if absent."""
    text = _query_value(request, "wait")
    if text is None:
        return None
    try:
        seconds = float(text.removesuffix("s"))
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # NaN too
        raise errors.InvalidArgument(
            f"wait must be a number of seconds, not {text[:40]!r}",
            {"fields": "wait"},
            [errors.FieldViolation("wait", "a number of seconds, e.g. 30 or 30s")],
        )
    return min(seconds, MAX_WAIT_SECONDS)


def _query_value(request: Request, name: str) -> str | None:
    for key, value in request.query_pairs():
        if key == name:
            return value
    return None


def _same_version(have: str, etag: str) -> bool:
    """Whether the caller's version (an etag, quoted or bare, or an If-None-Match list)
    names etag."""
    return canonical.matches(have, etag) or have.strip('"') == etag.removeprefix("W/").strip('"')


def loopback(addr: str) -> str:
    """addr to connect to: a wildcard host means this host."""
    host, port = addr.rsplit(":", 1)
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "") else addr


def unreadable(status: int = 400, message: str = NOT_HTTP) -> Response:
    """The answer to bytes the server will not read as a request (not HTTP, too large,
    too slow): refused like a too large body, with its own HTTP status, in the legacy
    envelope."""
    request = Request.unread()
    failure = statuses.status_of(errors.InvalidArgument(message))
    return _json(status, legacy.failure(failure, request), request)


def _failure(kind: Kind, status: status_pb2.Status, request: Request, extra: Headers) -> Response:
    """A failure in the style of the route: grpc-gateway's, the API gateway's or bk-sops's."""
    if kind == CANONICAL:
        if statuses.code_of(status) == grpc.StatusCode.UNAUTHENTICATED:  # as grpc-gateway does
            extra += ((b"www-authenticate", _header_text(status.message)),)
        return _json(statuses.http_status(status), canonical.status_json(status), request, extra)
    gateway = statuses.gateway_error(status) if kind == APIGW else None
    if gateway is not None:
        http_status, code, code_name = gateway
        extra += (
            (b"x-bkapi-error-code", str(code).encode("ascii")),
            (b"x-bkapi-error-message", _header_text(status.message)),
        )
        body = legacy.gateway_failure(status, code, code_name)
        return _json(http_status, body, request, extra)
    return _json(
        statuses.legacy_http_status(status), legacy.failure(status, request), request, extra
    )


def _header_text(text: str) -> bytes:
    """text as a header value: printable ASCII only, short."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:200]).encode("ascii")


def _json(status: int, value: Any, request: Request, extra: Headers = ()) -> Response:
    """A JSON response with the request and trace ids every response carries; value is
    encoded here, or already JSON text (bytes)."""
    body = value if isinstance(value, bytes) else dumps(value)
    headers = (
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        *_ids(request),
        *extra,
    )
    return Response(status, body, headers)


def _etag_header(etag: str) -> Headers:
    """The ETag header of a reply with an etag; none without."""
    return ((b"etag", etag.encode("ascii")),) if etag else ()


def _tagged(request: Request, etag: str) -> Response | None:
    """304 with no body for a GET whose If-None-Match names etag; None otherwise."""
    wanted = request.headers.get("if-none-match")
    if etag and request.method == "GET" and canonical.matches(wanted, etag):
        return Response(304, b"", (*_ids(request), *_etag_header(etag)))
    return None


def _ids(request: Request) -> Headers:
    """The request and trace id headers every response carries."""
    return (
        (b"x-bkapi-request-id", request.request_id.encode("ascii")),
        (b"sops-trace-id", request.trace_id.encode("ascii")),
    )


def dumps(value: Any) -> bytes:
    """The one JSON encoding of every body: compact, ASCII-only as Django's, ints exact."""
    return json.dumps(value, separators=(",", ":")).encode("ascii")

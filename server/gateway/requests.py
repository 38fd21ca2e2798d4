"""The HTTP request as the shim sees it, and reading its parts.

Everything here that reads caller input answers malformed input with a domain error
(InvalidArgument, PayloadTooLarge) whose message says what is wrong, never with an
exception of the parser's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from urllib.parse import parse_qsl

from server import errors
from server import traces
from server import values
from server.errors import FieldViolation

#: More query parameters than this is an attack or a bug, not a request.
MAX_QUERY_FIELDS = 256

Receive = Callable[[], Awaitable[dict[str, Any]]]


class Disconnected(Exception):
    """The client went away before it finished sending the request."""


@dataclass
class Request:
    """One HTTP request: what the caller sent, and the ids it is answered under."""

    method: str
    #: The raw path, still percent-encoded, without the query.
    path: str
    query: bytes
    #: Header names in lower case; of a repeated header, the last value.
    headers: dict[str, str]
    client: str
    #: The client as gRPC names a peer ("ipv4:10.0.0.1:5000", "ipv6:[::1]:5000"), or "-".
    peer: str
    request_id: str
    #: The trace id (32 hex digits) the legacy envelope, Sops-Trace-Id and the logs show.
    trace_id: str
    body: bytes = b""
    #: The route's path variables, decoded.
    path_vars: dict[str, str] = field(default_factory=dict)
    #: The template of the route that matched ("none" until one does): what metrics name.
    route: str = "none"

    @classmethod
    def from_scope(cls, scope: dict[str, Any]) -> Request:
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        client = scope.get("client")
        return cls(
            method=scope["method"],
            path=raw_path.decode("latin-1"),
            query=scope.get("query_string", b""),
            headers=headers,
            client=f"{client[0]}:{client[1]}" if client else "-",
            peer=_peer(client),
            request_id=uuid.uuid4().hex,
            trace_id=_trace_id(headers.get("traceparent")),
        )

    @classmethod
    def unread(cls) -> Request:
        """A request of which nothing could be read: it has only its ids."""
        return cls("", "", b"", {}, "-", "-", uuid.uuid4().hex, uuid.uuid4().hex)

    def query_pairs(self) -> list[tuple[str, str]]:
        """The query string's name/value pairs in order, percent-decoded."""
        try:
            return parse_qsl(
                self.query.decode("utf-8"),
                keep_blank_values=True,
                encoding="utf-8",
                errors="strict",
                max_num_fields=MAX_QUERY_FIELDS,
            )
        except UnicodeDecodeError:
            raise errors.InvalidArgument("the query string is not valid UTF-8") from None
        except ValueError:
            raise errors.InvalidArgument(
                f"the query string has more than {MAX_QUERY_FIELDS} parameters"
            ) from None

    def json_body(self) -> values.JSON:
        """The body as JSON of any kind; None for an empty body.

        The body is read as JSON whatever its Content-Type says: ``curl -d`` sends
        JSON labelled as a form, and the legacy callers send nothing else.
        """
        if not self.body.strip():
            return None
        try:
            text = self.body.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise errors.InvalidArgument("the request body is not valid UTF-8") from None
        try:
            return values.strict_loads(text)
        except RecursionError:
            problem = "is nested too deeply"
        except (json.JSONDecodeError, values.ValueProblem) as exc:
            problem = f"is not valid JSON: {exc}"
        except ValueError:  # int() refusing thousands of digits, in Python's own words
            problem = "holds a number with too many digits"
        raise errors.InvalidArgument(f"the request body {problem}")

    def json_object(self) -> dict[str, values.JSON]:
        """The body as a JSON object; {} for an empty body."""
        body = self.json_body()
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise errors.InvalidArgument(
                f"the request body must be a JSON object, not {show(body)}",
                {"fields": "body"},
                [FieldViolation("body", "must be a JSON object")],
            )
        return body


async def receive_body(receive: Receive, limit: int, content_length: str | None) -> bytes:
    """The whole body, refused (PayloadTooLarge) as soon as it is known to exceed limit."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise _too_large(limit)
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        body += message.get("body", b"")
        if len(body) > limit:
            raise _too_large(limit)
        if not message.get("more_body", False):
            return bytes(body)


def _too_large(limit: int) -> errors.PayloadTooLarge:
    return errors.PayloadTooLarge(
        f"the request body is larger than {limit} bytes", {"limit": str(limit)}
    )


def _trace_id(traceparent: str | None) -> str:
    """The trace id of the caller's traceparent, or a fresh one (32 hex digits either way);
    when tracing, the request's span has the same (server.gateway.app)."""
    return traces.trace_id_of(traceparent) or uuid.uuid4().hex


def show(value: values.JSON) -> str:
    """A value as an error message quotes it: short, and safe to print."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:40] + "..."
    return "an array" if isinstance(value, list) else "an object"


def _peer(client: Any) -> str:
    if not client:
        return "-"
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"

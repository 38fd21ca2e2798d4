"""Domain errors, and the one table that maps each to a gRPC code and a legacy code.

Every error the service can answer is a ServiceError subclass. Its class attributes
are the table: ``code`` (the canonical gRPC code), ``reason`` (the fixed
ErrorInfo reason) and ``legacy_code`` (the bk-sops code the JSON shim prints).
The HTTP status follows from ``code`` (grpc-gateway's mapping, in the shim).

    ServiceError
     +-- InvalidArgument            INVALID_ARGUMENT   3540000
     |    +-- InvalidSubprocessStack                   3599999
     |    +-- SubprocessStackMismatch                  3540000
     |    +-- InvalidLoop                              3540000
     |    +-- MalformedRequest                         3540000
     +-- NotFound                   NOT_FOUND
     |    +-- BusinessNotFound                         3540400
     |    +-- TaskNotFound                             3540400
     |    +-- NodeNotFound                             3540000
     |    +-- LoopNotFound                             3540400
     |    +-- ComponentNotFound                        3599999
     |    +-- RouteNotFound                            3540400  (HTTP 404)
     +-- StoreUnavailable           UNAVAILABLE        3555000
     +-- ShuttingDown               UNAVAILABLE        3555000
     +-- DeadlineExceeded           DEADLINE_EXCEEDED  3599999
     +-- UnsupportedEngine          FAILED_PRECONDITION 3599999
     +-- UnreadableData             FAILED_PRECONDITION 3599999
     +-- Internal                   INTERNAL           3599999
     +-- Unauthenticated            UNAUTHENTICATED    1306000  (gateway 1640001)
     |    +-- CredentialsMissing
     |    +-- CredentialsInvalid
     |    +-- UserUnverified
     +-- PermissionDenied           PERMISSION_DENIED  3599999  (gateway 1640301)
     +-- CredentialChecksThrottled  RESOURCE_EXHAUSTED 3555000  (HTTP 429)
     +-- BackendUnavailable         UNAVAILABLE        3555000
     +-- MethodNotAllowed           UNIMPLEMENTED      3540000  (HTTP 405)
     +-- PayloadTooLarge            RESOURCE_EXHAUSTED 3540000  (HTTP 413)
     +-- Overloaded                 RESOURCE_EXHAUSTED 3555000  (HTTP 429)
     +-- TooManyStreams             RESOURCE_EXHAUSTED 3555000  (HTTP 429)
     +-- WatchElsewhere             UNIMPLEMENTED      3540000  (HTTP 501)

The last four, and RouteNotFound, are raised only by the HTTP shim (server.gateway):
the gRPC backend cannot be reached, the HTTP request itself is refused, or the
process already serves as many HTTP requests as it admits. Those refusals keep
their HTTP status on every route (server.gateway.statuses). (Over gRPC, grpcio
itself refuses calls beyond the limit, RESOURCE_EXHAUSTED without details.)

An error never grows with the request that caused it: a status travels in HTTP/2
trailers, which gRPC clients refuse beyond 8 KiB by default (reporting
RESOURCE_EXHAUSTED instead of the error). ``bounded_violations`` and ``clip`` set
the limits below, and every status is built through them (server.interceptors.to_status).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc

DOMAIN = "tasknode.bksops.tencent.com"

#: Field violations listed in one error; one more says how many were left out.
MAX_VIOLATIONS = 10
#: UTF-8 bytes of the violations listed, all together.
MAX_VIOLATION_BYTES = 1536
#: UTF-8 bytes of each violation's field and description, and each ErrorInfo value.
MAX_TEXT_BYTES = 200
#: UTF-8 bytes of an error's message. With the limits above, a whole status (message,
#: ErrorInfo with our few keys, BadRequest) is at most about 3 KiB, under 6 KiB as gRPC
#: trailers (details in base64, the message percent-encoded beside them).
MAX_MESSAGE_BYTES = 512


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its proto name and what is wrong with it."""

    field: str
    description: str


class ServiceError(Exception):
    """Base of every error a caller may see; never raised itself."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[str] = "INTERNAL"
    legacy_code: ClassVar[int] = 3599999
    #: (code, code_name) of the API gateway's own envelope, for errors the gateway raises.
    gateway_error: ClassVar[tuple[int, str] | None] = None

    def __init__(
        self,
        message: str,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)


class InvalidArgument(ServiceError):
    """A request field is missing or malformed; the BadRequest detail names each one."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"
    legacy_code = 3540000


class InvalidSubprocessStack(InvalidArgument):
    """subprocess_stack is not a list of node ids (legacy: not a JSON array of strings)."""

    reason = "INVALID_SUBPROCESS_STACK"
    legacy_code = 3599999


class SubprocessStackMismatch(InvalidArgument):
    """subprocess_stack does not lead to the node: the message names the expected path."""

    reason = "SUBPROCESS_STACK_MISMATCH"


class InvalidLoop(InvalidArgument):
    """loop is not a positive integer."""

    reason = "INVALID_LOOP"


class MalformedRequest(InvalidArgument):
    """The request's bytes are not its protobuf message (corrupt, or a string not UTF-8)."""

    reason = "MALFORMED_REQUEST"


class NotFound(ServiceError):
    """Something the request names does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"
    legacy_code = 3540400


class BusinessNotFound(NotFound):
    """No business (or project, with scope project) has that id."""

    reason = "BUSINESS_NOT_FOUND"


class TaskNotFound(NotFound):
    """The business has no (undeleted) task with that id."""

    reason = "TASK_NOT_FOUND"


class NodeNotFound(NotFound):
    """The task has no node with that id at any depth."""

    reason = "NODE_NOT_FOUND"
    legacy_code = 3540000


class LoopNotFound(NotFound):
    """The node has no record of the older loop asked for."""

    reason = "LOOP_NOT_FOUND"


class ComponentNotFound(NotFound):
    """No output schema is known for that component code at the node's version."""

    reason = "COMPONENT_NOT_FOUND"
    legacy_code = 3599999


class StoreUnavailable(ServiceError):
    """The database cannot be reached or answered with an error; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"
    legacy_code = 3555000


class ShuttingDown(ServiceError):
    """The server is draining after SIGTERM and takes no new calls; another server will."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"
    legacy_code = 3555000


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work could be done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class UnsupportedEngine(ServiceError):
    """A bk-sops task of an engine this service does not read (the legacy engine, 1)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "UNSUPPORTED_ENGINE"
    legacy_code = 3599999


class UnsupportedByStore(ServiceError):
    """A method the configured node store does not answer yet (ListTaskNodes on a
    bk-sops database)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "UNSUPPORTED_BY_STORE"
    legacy_code = 3599999


class UnreadableData(ServiceError):
    """Stored data of the task that cannot be served as it is: a pickle naming something
    off the allow-list, a value JSON cannot carry exactly, a corrupt tree."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "UNREADABLE_DATA"
    legacy_code = 3599999


class Internal(ServiceError):
    """A bug: logged with its traceback on the server, answered without details."""


class RouteNotFound(NotFound):
    """The HTTP shim has no route for the request's path."""

    reason = "ROUTE_NOT_FOUND"


class BackendUnavailable(ServiceError):
    """The HTTP shim cannot reach the gRPC server it calls; the message names its address."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_UNAVAILABLE"
    legacy_code = 3555000


class MethodNotAllowed(ServiceError):
    """The HTTP shim serves the path, but not with the request's HTTP method."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "METHOD_NOT_ALLOWED"
    legacy_code = 3540000


class PayloadTooLarge(ServiceError):
    """The HTTP request body is larger than the shim accepts (gRPC's own word for it)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "PAYLOAD_TOO_LARGE"
    legacy_code = 3540000


class Overloaded(ServiceError):
    """The process already serves as many calls as it admits; retrying later may help."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"
    legacy_code = 3555000


class TooManyStreams(ServiceError):
    """The process has as many watch streams open as it allows (config.watch_max_streams);
    another process, or a retry later, may take the stream."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "TOO_MANY_WATCH_STREAMS"
    legacy_code = 3555000


class WatchElsewhere(ServiceError):
    """A watch stream asked of the unary server: the streams are served on the watch
    address (server.watch), named in the metadata as watchAddr."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "WATCH_ON_WATCH_ADDR"
    legacy_code = 3540000


class CredentialChecksThrottled(ServiceError):
    """A secret could not be checked now: its caller failed too many checks lately, or the
    process is hashing as many secrets as it may (server.throttle). Retrying later may help.

    Not UNAUTHENTICATED: the credentials were not checked, and a caller with good ones
    (say, on a fresh server process) must retry, not conclude they are wrong. An unknown
    app is throttled alike, so this says nothing about which apps exist. Like the shim's
    refusals it keeps its HTTP status, 429, on every route (server.gateway.statuses).
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "CREDENTIAL_CHECKS_THROTTLED"
    legacy_code = 3555000


class Unauthenticated(ServiceError):
    """The call came without valid app credentials or user identity.

    The legacy codes differ by route: the old ESB answers 1306000 (HTTP 200), the API
    gateway INVALID_ARGS 1640001 with HTTP 400.
    """

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"
    legacy_code = 1306000
    gateway_error = (1640001, "INVALID_ARGS")


class CredentialsMissing(Unauthenticated):
    """No credentials, or an app code or secret left out."""

    reason = "CREDENTIALS_MISSING"


class CredentialsInvalid(Unauthenticated):
    """An unknown app, a wrong secret or a revoked app; which one is not said."""

    reason = "CREDENTIALS_INVALID"


class UserUnverified(Unauthenticated):
    """No user identity, a bk_username from an app that may not assert one, or a bad bk_token."""

    reason = "USER_UNVERIFIED"


class PermissionDenied(ServiceError):
    """The app may not read the business asked for; nothing is said about its tasks."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "BUSINESS_NOT_GRANTED"
    legacy_code = 3599999
    gateway_error = (1640301, "APP_NO_PERMISSION")


def clip(text: str, limit: int) -> str:
    """text, cut to at most limit bytes of UTF-8 on a character boundary; "…" marks a cut."""
    if len(text) * 4 <= limit:  # short enough whatever its characters
        return text
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - len("…".encode())].decode("utf-8", "ignore") + "…"


def bounded_violations(violations: Sequence[FieldViolation]) -> list[FieldViolation]:
    """The violations an error lists: the first MAX_VIOLATIONS (fewer if they pass
    MAX_VIOLATION_BYTES), each clipped, then one saying how many more there were."""
    listed: list[FieldViolation] = []
    size = 0
    for violation in violations[:MAX_VIOLATIONS]:
        field = clip(violation.field, MAX_TEXT_BYTES)
        description = clip(violation.description, MAX_TEXT_BYTES)
        size += len(f"{field}{description}".encode("utf-8", "replace"))
        if size > MAX_VIOLATION_BYTES:
            break
        listed.append(FieldViolation(field, description))
    left_out = violations[len(listed) :]
    if left_out:
        # Most often the rest are entries of one list (subprocess_stack[i]): name the list.
        fields = {v.field.split("[")[0] for v in left_out}
        field = clip(fields.pop(), MAX_TEXT_BYTES) if len(fields) == 1 else ""
        listed.append(FieldViolation(field, f"and {len(left_out)} more violations, not listed"))
    return listed


def error_classes() -> list[type[ServiceError]]:
    """Every concrete error class, the table's rows."""
    found: list[type[ServiceError]] = []
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def legacy_code_for(reason: str) -> int:
    """The legacy code for an ErrorInfo reason (a reason we do not know: UNKNOWN_ERROR)."""
    return LEGACY_CODES.get(reason, ServiceError.legacy_code)


LEGACY_CODES: dict[str, int] = {cls.reason: cls.legacy_code for cls in error_classes()}

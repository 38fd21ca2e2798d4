"""The one table from gRPC codes to HTTP statuses, and the legacy code of a status.

The shim's currency for failures is the ``google.rpc.Status`` the gRPC server sends:
its code, message and details (ErrorInfo always, BadRequest for bad fields). Errors
the shim finds itself are domain errors from server.errors, turned into the very
Status the server would send for them, so every route renders one kind of thing.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from google.rpc import status_pb2

from server import errors
from server.interceptors import rich_status

#: grpc-gateway's HTTPStatusFromCode (runtime/errors.go), the same as google/rpc/code.proto.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

#: Refusals of the HTTP request itself, or of its credentials unchecked. They are about HTTP
#: or load, not about the business, so they keep their own status on every route, the legacy
#: ones (HTTP 200 for business errors) too: a client backs off on a 429 whatever the route.
HTTP_REFUSALS: dict[str, int] = {
    errors.RouteNotFound.reason: 404,
    errors.MethodNotAllowed.reason: 405,
    errors.PayloadTooLarge.reason: 413,
    errors.Overloaded.reason: 429,
    errors.TooManyStreams.reason: 429,
    errors.CredentialChecksThrottled.reason: 429,
}

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_GATEWAY_ERRORS = {
    cls.reason: cls.gateway_error for cls in errors.error_classes() if cls.gateway_error
}


def status_of(exc: errors.ServiceError) -> status_pb2.Status:
    """The google.rpc.Status the gRPC server sends for exc, details and all."""
    return rich_status(exc)


def code_of(status: status_pb2.Status) -> grpc.StatusCode:
    """The status's code; a number gRPC does not define reads as UNKNOWN."""
    return _CODES.get(status.code, grpc.StatusCode.UNKNOWN)


def reason_of(status: status_pb2.Status) -> str:
    """The ErrorInfo reason in the status's details; "" when there is none."""
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            return info.reason
    return ""


def http_status(status: status_pb2.Status) -> int:
    """The HTTP status of a failure on the canonical (grpc-gateway) routes."""
    return HTTP_REFUSALS.get(reason_of(status)) or HTTP_STATUS[code_of(status)]


def legacy_http_status(status: status_pb2.Status) -> int:
    """The HTTP status of a failure on the legacy routes: 200, as bk-sops and the ESB answer."""
    return HTTP_REFUSALS.get(reason_of(status), 200)


def legacy_code(status: status_pb2.Status) -> int:
    """The bk-sops code of a failure, from its ErrorInfo reason (none: UNKNOWN_ERROR)."""
    return errors.legacy_code_for(reason_of(status))


def gateway_error(status: status_pb2.Status) -> tuple[int, int, str] | None:
    """(HTTP status, code, code_name) of the API gateway's own envelope, for the errors the
    gateway itself would raise (credentials, permission); None for the others.

    The gateway's codes spell their HTTP status: 16|400|01 is INVALID_ARGS, 16|403|01
    APP_NO_PERMISSION.
    """
    found = _GATEWAY_ERRORS.get(reason_of(status))
    if found is None:
        return None
    code, code_name = found
    return int(str(code)[2:5]), code, code_name

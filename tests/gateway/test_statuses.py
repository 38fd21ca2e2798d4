"""The one table: gRPC codes to HTTP statuses, and every domain error's legacy code."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import status_pb2

from server import errors
from server.gateway import statuses


def test_every_grpc_code_has_grpc_gateways_http_status() -> None:
    assert set(statuses.HTTP_STATUS) == set(grpc.StatusCode)
    assert {code.name: status for code, status in statuses.HTTP_STATUS.items()} == {
        "OK": 200,
        "CANCELLED": 499,
        "UNKNOWN": 500,
        "INVALID_ARGUMENT": 400,
        "DEADLINE_EXCEEDED": 504,
        "NOT_FOUND": 404,
        "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403,
        "UNAUTHENTICATED": 401,
        "RESOURCE_EXHAUSTED": 429,
        "FAILED_PRECONDITION": 400,
        "ABORTED": 409,
        "OUT_OF_RANGE": 400,
        "UNIMPLEMENTED": 501,
        "INTERNAL": 500,
        "UNAVAILABLE": 503,
        "DATA_LOSS": 500,
    }


@pytest.mark.parametrize("error", errors.error_classes(), ids=lambda cls: cls.__name__)
def test_every_domain_error_renders_by_its_row(error: type[errors.ServiceError]) -> None:
    status = statuses.status_of(error("message"))
    assert (statuses.code_of(status), status.message) == (error.code, "message")
    assert statuses.reason_of(status) == error.reason
    assert statuses.legacy_code(status) == error.legacy_code
    refusal = statuses.HTTP_REFUSALS.get(error.reason)
    assert statuses.http_status(status) == (refusal or statuses.HTTP_STATUS[error.code])
    assert statuses.legacy_http_status(status) == (refusal or 200)
    gateway = statuses.gateway_error(status)
    assert (gateway is None) == (error.gateway_error is None)


def test_the_gateway_codes_spell_their_http_status() -> None:
    unauthenticated = statuses.status_of(errors.CredentialsMissing("no"))
    assert statuses.gateway_error(unauthenticated) == (400, 1640001, "INVALID_ARGS")
    denied = statuses.status_of(errors.PermissionDenied("no"))
    assert statuses.gateway_error(denied) == (403, 1640301, "APP_NO_PERMISSION")


def test_a_status_without_error_info_is_an_unknown_error() -> None:
    bare = status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="busy")
    assert statuses.reason_of(bare) == ""
    assert statuses.legacy_code(bare) == 3599999
    assert (statuses.http_status(bare), statuses.legacy_http_status(bare)) == (429, 200)
    assert statuses.http_status(status_pb2.Status(code=99)) == 500

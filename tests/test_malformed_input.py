"""Malformed input over gRPC is the caller's error: bytes that are not a request,
metadata that breaks gRPC's rules, and requests that would make huge errors. Each is
answered INVALID_ARGUMENT or UNAUTHENTICATED, with an access line, no traceback in the
log, and a status far under the 8 KiB of trailers gRPC clients accept."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server import errors
from server.app import Server
from server.app import method_path
from server.auth import METADATA_KEY
from server.cli import DEMO_APP
from server.gateway.local import Aborted
from server.gateway.local import LocalContext
from server.interceptors import to_status
from tests.conftest import seed_request
from tests.raw_grpc import raw_call

GET_DETAIL = method_path(
    pb.DESCRIPTOR.services_by_name["TaskNodeService"].methods_by_name["GetTaskNodeDetail"]
)
CREDENTIALS = json.dumps(DEMO_APP)
#: Bytes that are no GetTaskNodeDetailRequest, each in its own way.
NOT_REQUESTS = {
    "not protobuf": b"\xff\xff\xff\xff",
    "cut short": seed_request().SerializeToString()[:-3],
    "node_id not UTF-8": b"\x1a\x02\xff\xfe",
    "unknown groups nested past the parser's limit": b"\xa3\x06" * 10_000,
}
#: gRPC trailers a client accepts by default (grpc.max_metadata_size).
CLIENT_METADATA_LIMIT = 8 * 1024


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    return info.reason


def logged(caplog: pytest.LogCaptureFixture, server: Server) -> list[logging.LogRecord]:
    """Every record logged so far, the access lines written out first."""
    server.access.flush()
    return caplog.records


def access_lines(records: list[logging.LogRecord]) -> list[str]:
    return [
        line
        for record in records
        if record.name == "tasknode.access"
        for line in record.getMessage().splitlines()
    ]


def test_bytes_that_are_no_request_are_invalid_argument_with_an_access_line(
    channel: grpc.Channel, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # No serializers: the bytes go as they are.
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GET_DETAIL)
    for name, data in NOT_REQUESTS.items():
        with pytest.raises(grpc.RpcError) as raised:
            call(data, metadata=((METADATA_KEY, CREDENTIALS),), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert reason_of(raised.value) == "MALFORMED_REQUEST", name
        assert "not a valid protobuf message" in (raised.value.details() or ""), name
    records = logged(caplog, server)
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR or r.exc_info] == []
    lines = [line for line in access_lines(records) if "MALFORMED_REQUEST" in line]
    assert len(lines) == len(NOT_REQUESTS), access_lines(records)
    assert all(" app=- user=- INVALID_ARGUMENT/MALFORMED_REQUEST " in line for line in lines)


def test_a_request_is_still_parsed_in_process(server: Server) -> None:
    """The in-process path (the shim's) hands over messages or their bytes alike."""
    handler = server.handlers[GET_DETAIL].unary_unary
    assert handler is not None
    for request in (seed_request(), seed_request().SerializeToString()):
        context = LocalContext([(METADATA_KEY, CREDENTIALS)], deadline=float("inf"))
        assert handler(request, context).name
    with pytest.raises(Aborted) as aborted:
        handler(b"\xff\xff", LocalContext([(METADATA_KEY, CREDENTIALS)], float("inf")))
    assert aborted.value.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


#: x-bkapi-authorization metadata that breaks gRPC's rules, as raw HTTP/2 headers.
MALFORMED_METADATA: dict[str, list[tuple[bytes, bytes]]] = {
    "given twice": [(METADATA_KEY.encode(), CREDENTIALS.encode())] * 2,
    "under the -bin key": [(f"{METADATA_KEY}-bin".encode(), b"e30")],
    "not UTF-8": [
        (METADATA_KEY.encode(), CREDENTIALS.replace("admin", "adm\xff").encode("latin-1"))
    ],
    "UTF-8 that is not ASCII": [
        (METADATA_KEY.encode(), CREDENTIALS.replace("admin", "管理").encode())
    ],
    "a control character": [
        (METADATA_KEY.encode(), CREDENTIALS.replace("admin", "adm\x01").encode())
    ],
}


def test_malformed_credential_metadata_is_unreadable_credentials(
    grpc_address: str, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = seed_request().SerializeToString()
    for name, metadata in MALFORMED_METADATA.items():
        reply = raw_call(grpc_address, GET_DETAIL, metadata, request)
        assert (reply.code, reply.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIALS_INVALID",
        ), (name, reply.message)
        assert METADATA_KEY in reply.message, name
    records = logged(caplog, server)
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR or r.exc_info] == []
    everything = "\n".join(r.getMessage() for r in records)
    assert "bk_app_secret" not in everything  # no credential text at all, the secret "xxx" in it
    # grpcio's own line about the bytes that are not UTF-8, without them:
    assert "grpcio received a value that is not UTF-8: <" in everything
    refused = [line for line in access_lines(records) if "CREDENTIALS_INVALID" in line]
    assert len(refused) == len(MALFORMED_METADATA), access_lines(records)


def test_an_error_stays_small_however_many_fields_are_bad(
    stub: pb_grpc.TaskNodeServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetTaskNodeDetail(seed_request(subprocess_stack=["not a node id!"] * 5000), timeout=10)
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(error) == "INVALID_SUBPROCESS_STACK"
    trailers = sum(len(m.key) + len(m.value) for m in error.trailing_metadata())
    assert trailers < 2048, trailers
    status = rpc_status.from_call(error)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    assert len(bad.field_violations) == errors.MAX_VIOLATIONS + 1
    assert bad.field_violations[0].field == "subprocess_stack"  # deeper than 32 levels
    assert bad.field_violations[-1].field == "subprocess_stack"
    assert bad.field_violations[-1].description == "and 4991 more violations, not listed"


def test_every_part_of_an_error_is_bounded() -> None:
    """Whatever an error holds, its status fits a client's trailers with room to spare."""
    huge = "界" * 100_000
    exc = errors.InvalidArgument(
        huge,
        {"fields": huge, "appCode": huge, "nodeId": huge},
        [errors.FieldViolation(huge, huge)] * 1000,
    )
    status = to_status(exc)
    size = sum(len(k) + len(v) for k, v in status.trailing_metadata)
    message = status.details.encode("utf-8")
    assert len(message) <= errors.MAX_MESSAGE_BYTES and message.endswith("…".encode())
    # grpc-message is percent-encoded (3 bytes a byte at worst), details-bin base64 (4/3).
    assert 3 * len(message) + size * 4 // 3 < CLIENT_METADATA_LIMIT * 3 // 4, size

"""Malformed input over gRPC is the caller's error: requests that would make huge
errors get a status far under the 8 KiB of trailers gRPC clients accept."""

from __future__ import annotations

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server import errors
from server.interceptors import to_status
from tests.conftest import seed_request

#: gRPC trailers a client accepts by default (grpc.max_metadata_size).
CLIENT_METADATA_LIMIT = 8 * 1024


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    return info.reason


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

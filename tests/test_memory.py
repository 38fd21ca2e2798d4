"""Error paths leave nothing behind once they have answered."""

from __future__ import annotations

import gc
import json
import logging
import tracemalloc
import uuid
from collections.abc import Callable

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.auth import METADATA_KEY
from server.cli import DEMO_APP
from tests.conftest import seed_request

GET_TASK_NODE_DETAIL = "/bksops.tasknode.v1.TaskNodeService/GetTaskNodeDetail"

#: Calls measured; each names an app of its own, so each is a new entry of the
#: credential cache, which keeps up to 10,000 outcomes by design.
CALLS = 2000
#: What one remembered failure may cost: its cache entry (key, expiry, error and its
#: metadata: ~850 bytes measured), not the call it answered (~9,600 bytes measured when
#: the cached error held its traceback, and through it the call's frames and state).
BYTES_PER_FAILURE = 2048


#: What a refused call may leave behind when nothing of it is remembered: noise.
BYTES_PER_FORGOTTEN_CALL = 256


def growth_per_call(call: Callable[[], None], count: int) -> float:
    """Bytes of Python memory still held, per call, after count calls (after a warm-up)."""
    for _ in range(200):  # the channel, and caches of grpcio and ours that fill once
        call()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            call()
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()


def test_a_refused_call_is_not_kept_alive_by_the_credential_cache(
    grpc_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each refusal logs a line; pytest would keep every record.
    monkeypatch.setattr(logging.getLogger("tasknode.auth"), "disabled", True)
    with grpc.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.TaskNodeServiceStub(channel)

        def unknown_app() -> None:
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetTaskNodeDetail(
                    seed_request(), timeout=10, metadata=[(METADATA_KEY, _unknown_app())]
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        grown = growth_per_call(unknown_app, CALLS)
    assert grown < BYTES_PER_FAILURE, f"{grown:.0f} bytes a refused call"


def _unknown_app() -> str:
    # One wrong secret for all, so its check is hashed once and then remembered.
    return f'{{"bk_app_code": "{uuid.uuid4().hex}", "bk_app_secret": "wrong", "bk_username": "u"}}'


def test_bytes_that_are_no_request_leave_nothing_behind(grpc_address: str) -> None:
    # grpcio's own request parsing kept each such call's state for good when parsing failed.
    with grpc.insecure_channel(grpc_address) as channel:
        raw: grpc.UnaryUnaryMultiCallable = channel.unary_unary(GET_TASK_NODE_DETAIL)
        demo = ((METADATA_KEY, json.dumps(DEMO_APP)),)

        def not_a_request() -> None:
            with pytest.raises(grpc.RpcError) as refused:
                raw(b"\xff\xff\xff" + uuid.uuid4().bytes, timeout=10, metadata=demo)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        grown = growth_per_call(not_a_request, CALLS)
    assert grown < BYTES_PER_FORGOTTEN_CALL, f"{grown:.0f} bytes a refused call"

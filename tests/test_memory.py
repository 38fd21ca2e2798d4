"""Error paths leave nothing behind once they have answered."""

from __future__ import annotations

import gc
import logging
import tracemalloc
import uuid

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from tests.conftest import seed_request

#: Calls measured; each names an app of its own, so each is a new entry of the
#: credential cache, which keeps up to 10,000 outcomes by design.
CALLS = 2000
#: What one remembered failure may cost: its cache entry (key, expiry, error and its
#: metadata: ~850 bytes measured), not the call it answered (~9,600 bytes measured when
#: the cached error held its traceback, and through it the call's frames and state).
BYTES_PER_FAILURE = 2048


def refuse_unknown_apps(stub: pb_grpc.TaskNodeServiceStub, count: int) -> None:
    for _ in range(count):
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetTaskNodeDetail(
                seed_request(),
                timeout=10,
                metadata=[("x-bkapi-authorization", _unknown_app())],
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _unknown_app() -> str:
    # One wrong secret for all, so its check is hashed once and then remembered.
    return f'{{"bk_app_code": "{uuid.uuid4().hex}", "bk_app_secret": "wrong", "bk_username": "u"}}'


def test_a_refused_call_is_not_kept_alive_by_the_credential_cache(
    grpc_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each refusal logs a line; pytest would keep every record.
    monkeypatch.setattr(logging.getLogger("tasknode.auth"), "disabled", True)
    with grpc.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.TaskNodeServiceStub(channel)
        refuse_unknown_apps(stub, 200)  # warm: channel, caches of grpcio and ours
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            refuse_unknown_apps(stub, CALLS)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert grown / CALLS < BYTES_PER_FAILURE, f"{grown / CALLS:.0f} bytes a refused call"

"""The shim's in-process backend on its own: what a call returns, and how it fails."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent import futures
from typing import Any

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from google.rpc import error_details_pb2

from server.app import Server
from server.app import method_path
from server.auth import METADATA_KEY
from server.cli import DEMO_APP
from server.gateway.client import CallFailed
from server.gateway.local import LocalBackend
from tests.conftest import SEED_NODE
from tests.conftest import seed_request

METHOD = pb.DESCRIPTOR.services_by_name["TaskNodeService"].methods_by_name["GetTaskNodeDetail"]
AS_DEMO = [(METADATA_KEY, json.dumps(DEMO_APP))]


def call(backend: LocalBackend, request: pb.GetTaskNodeDetailRequest, **options: Any) -> Any:
    return asyncio.run(backend.call(METHOD, request, **options))


def failure(backend: LocalBackend, request: pb.GetTaskNodeDetailRequest) -> tuple[int, str]:
    """The code and ErrorInfo reason of a call that must fail."""
    with pytest.raises(CallFailed) as failed:
        call(backend, request, metadata=AS_DEMO)
    info = error_details_pb2.ErrorInfo()
    assert failed.value.status.details[0].Unpack(info)
    return failed.value.status.code, info.reason


def test_a_reply_as_a_message_or_as_its_bytes(server: Server) -> None:
    backend = LocalBackend(server.handlers, server.workers)
    detail = call(backend, seed_request(), metadata=AS_DEMO)
    assert detail.id == SEED_NODE
    raw = call(backend, seed_request(), metadata=AS_DEMO, raw=True)
    assert pb.NodeDetail.FromString(raw) == detail


def test_failures_carry_the_status_the_server_would_send(server: Server) -> None:
    backend = LocalBackend(server.handlers, server.workers)
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED.value[0]
    with pytest.raises(CallFailed) as failed:
        call(backend, seed_request(), metadata=[])
    assert failed.value.status.code == unauthenticated
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    assert failure(backend, seed_request(task_id="99999")) == (not_found, "TASK_NOT_FOUND")


def test_a_call_past_its_deadline_is_deadline_exceeded(server: Server) -> None:
    backend = LocalBackend(server.handlers, server.workers, timeout=0)
    code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert failure(backend, seed_request()) == (code, "DEADLINE_EXCEEDED")


def test_in_process_calls_are_logged_with_the_http_client_as_peer(server: Server) -> None:
    backend = LocalBackend(server.handlers, server.workers)
    recorded: list[tuple[object, ...]] = []
    server.access.record = lambda *fields: recorded.append(fields)  # type: ignore[method-assign]
    call(backend, seed_request(), metadata=AS_DEMO, peer="ipv6:[::1]:5000")
    assert recorded[0][0] == "ipv6:[::1]:5000"
    assert recorded[0][2:5] == ("esb_test", "admin", "OK")


def test_calls_beyond_the_limit_are_refused_at_once_and_the_limit_frees_up() -> None:
    path = method_path(METHOD)
    release = threading.Event()

    def held(request: pb.GetTaskNodeDetailRequest, context: grpc.ServicerContext) -> pb.NodeDetail:
        release.wait(10)
        return pb.NodeDetail(id=request.node_id)

    handlers: dict[str, grpc.RpcMethodHandler] = {path: grpc.unary_unary_rpc_method_handler(held)}
    with futures.ThreadPoolExecutor(4) as executor:
        backend = LocalBackend(handlers, executor, limit=1)

        async def scenario() -> tuple[str, int, str, str]:
            first = asyncio.create_task(backend.call(METHOD, seed_request(), metadata=[]))
            await asyncio.sleep(0.05)  # the first call is being served
            with pytest.raises(CallFailed) as refused:
                await backend.call(METHOD, seed_request(), metadata=[])
            release.set()
            served = await first
            again = await backend.call(METHOD, seed_request(node_id="again"), metadata=[])
            return served.id, refused.value.status.code, refused.value.status.message, again.id

        served, code, message, again = asyncio.run(scenario())
    assert (served, again) == (SEED_NODE, "again")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "serving 1 requests at once" in message

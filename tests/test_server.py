"""The server around the service: health, reflection, limits, deadlines, shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc
from grpc_status import rpc_status

from server import nodes
from server.app import Server
from server.app import create_server
from server.auth import Principal
from server.cache import DetailCache
from server.cli import load_demo_if_empty
from server.config import Config
from server.convert import Mask
from server.db.store import Store
from server.query import NodeQuery
from tests.conftest import authorized
from tests.conftest import seed_request
from tests.processes import start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
SERVING_LINE = re.compile(r"serving .* on 127\.0\.0\.1:(\d+)")


def health_of(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_is_serving(channel: grpc.Channel) -> None:
    assert health_of(channel) == SERVING
    assert health_of(channel, "bksops.tasknode.v1.TaskNodeService") == SERVING


def test_reflection_lists_and_describes(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="bksops.tasknode.v1.TaskNodeService"
        ),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        "bksops.tasknode.v1.TaskNodeService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert described.file_descriptor_response.file_descriptor_proto


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make every GetTaskNodeDetail wait until the returned event is set (at most 10 s)."""
    release = threading.Event()
    real = nodes.read_node_detail

    def waiting(
        store: Store,
        query: NodeQuery,
        mask: Mask,
        principal: Principal,
        cache: DetailCache | None = None,
    ) -> pb.NodeDetail:
        release.wait(10)
        return real(store, query, mask, principal, cache)

    monkeypatch.setattr("server.handlers.task_node.read_node_detail", waiting)
    return release


@pytest.fixture
def small_server(demo_config: Config) -> Iterator[Server]:
    """A server that admits 2 calls at once and requests up to 1 KiB."""
    config = Config(
        database_url=demo_config.database_url,
        grpc_addr="127.0.0.1:0",
        max_concurrent_rpcs=2,
        max_receive_message_bytes=1024,
    )
    running = create_server(config)
    running.start()
    yield running
    running.stop(None)


def test_calls_beyond_the_limit_are_refused_at_once(
    small_server: Server, slow: threading.Event
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{small_server.port}") as channel:
        stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
        admitted = [stub.GetTaskNodeDetail.future(seed_request(), timeout=10) for _ in range(2)]
        time.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetTaskNodeDetail(seed_request(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 1
        slow.set()
        assert all(f.result().id for f in admitted)


def test_requests_over_the_size_limit_are_refused(small_server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{small_server.port}") as channel:
        stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetTaskNodeDetail(seed_request(component_code="x" * 2000), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_is_respected(stub: pb_grpc.TaskNodeServiceStub, slow: threading.Event) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as late:
        stub.GetTaskNodeDetail(seed_request(), timeout=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2
    slow.set()


def test_graceful_stop_lets_in_flight_calls_finish(
    demo_config: Config, slow: threading.Event
) -> None:
    with stopping_during_a_call(demo_config, grace=5) as (in_flight, stopper):
        assert stopper.is_alive(), "stop waits for the call in flight"
        slow.set()
        assert in_flight.result().id == seed_request().node_id
        stopper.join(5)
        assert not stopper.is_alive()


def test_stop_refuses_new_calls_at_once_and_lets_admitted_ones_finish(
    demo_config: Config, slow: threading.Event
) -> None:
    running = create_server(demo_config)
    running.start()
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
        admitted = stub.GetTaskNodeDetail.future(seed_request(), timeout=10)
        time.sleep(0.3)
        stopper = threading.Thread(target=running.stop, args=(10,))
        stopper.start()
        time.sleep(0.3)
        assert health_of(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetTaskNodeDetail(seed_request(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stopper.is_alive(), "stop waits for the admitted call"
        slow.set()
        assert admitted.result().id == seed_request().node_id
        stopper.join(5)
        assert not stopper.is_alive()


@contextmanager
def stopping_during_a_call(
    config: Config, grace: float | None
) -> Iterator[tuple[grpc.Future, threading.Thread]]:
    """A server on config with one call in flight, being stopped with grace in a thread:
    (the call, the stopping thread). Use with the slow fixture, which holds the call."""
    running = create_server(config)
    running.start()
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
        call = stub.GetTaskNodeDetail.future(seed_request(), timeout=10)
        time.sleep(0.3)
        stopper = threading.Thread(target=running.stop, args=(grace,))
        stopper.start()
        time.sleep(0.3)
        yield call, stopper


def test_a_bug_is_internal_without_details(
    stub: pb_grpc.TaskNodeServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> pb.NodeDetail:
        raise KeyError("secret internals")

    monkeypatch.setattr("server.handlers.task_node.read_node_detail", broken)
    with pytest.raises(grpc.RpcError) as failed:
        stub.GetTaskNodeDetail(seed_request(), timeout=5)
    error = failed.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret internals" not in (error.details() or "")
    status = rpc_status.from_call(error)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    assert info.reason == "INTERNAL"


def test_an_unreachable_database_is_unavailable(sqlite_config: Config, tmp_path: Path) -> None:
    load_demo_if_empty(sqlite_config)
    server = create_server(sqlite_config)
    server.start()
    for path in tmp_path.iterdir():
        path.unlink()
    tmp_path.rmdir()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
        with pytest.raises(grpc.RpcError) as failed:
            stub.GetTaskNodeDetail(seed_request(), timeout=5)
    server.stop(None)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry" in (failed.value.details() or "")


def test_sigterm_drains_and_exits(tmp_path: Path) -> None:
    env = {
        "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
        "TASKNODE_HTTP_ADDR": "127.0.0.1:0",
    }
    process, found = start_server(["serve", "--demo"], env, SERVING_LINE)
    assert process.stdout is not None
    port = int(found.group(1))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert health_of(channel) == SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    rest = process.stdout.read()
    process.stdout.close()
    assert "draining" in rest and "stopped" in rest


def test_a_taken_address_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    for processes in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-m", "server", "serve"],
            env={
                **os.environ,
                "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'other.db'}",
                "TASKNODE_GRPC_ADDR": f"127.0.0.1:{server.port}",
                "TASKNODE_HTTP_ADDR": "",
                "TASKNODE_GRPC_PROCESSES": processes,
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert "cannot" in result.stderr and "Traceback" not in result.stderr


def test_stop_keeps_the_store_open_until_cut_off_calls_end(
    demo_config: Config, slow: threading.Event
) -> None:
    with stopping_during_a_call(demo_config, grace=None) as (cut_off, stopper):
        assert stopper.is_alive(), "the store stays open while the call's thread runs"
        slow.set()
        stopper.join(10)
        assert not stopper.is_alive()
        with pytest.raises(grpc.RpcError):
            cut_off.result()

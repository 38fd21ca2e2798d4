"""A watch stream's caller is checked again while the stream lasts (server.watch.service).

An app whose secret is revoked or whose grant is withdrawn has its open streams ended
(UNAUTHENTICATED, PERMISSION_DENIED) within twice TASKNODE_AUTH_CACHE_SECONDS, as its
unary calls are refused within once; other callers' streams go on. Every store runs it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.app import Server
from server.app import create_server
from server.config import Config
from server.db.apps import AppStore
from server.watch.service import Grant
from server.watch.service import serve_watch
from tests import documents
from tests.conftest import ALL_APP
from tests.documents import node

TASK = 811
CACHE_SECONDS = 0.2
#: The longest a refused stream may last: two checks' worth, and slack for a loaded machine.
BOUND_SECONDS = 2 * CACHE_SECONDS + 2.0
WATCHER = {"bk_app_code": "watcher", "bk_app_secret": "watcher-secret", "bk_username": "ops"}


@pytest.fixture
def watching(demo_config: Config) -> Iterator[tuple[Server, grpc.Channel]]:
    config = dataclasses.replace(
        demo_config,
        watch_addr="127.0.0.1:0",
        watch_interval=0.05,
        watch_heartbeat_seconds=0.3,
        auth_cache_seconds=CACHE_SECONDS,
    )
    server = create_server(config)
    server.start()
    execution = {"state": "RUNNING", "version": "r0", "start_time": documents.STARTED}
    documents.load(
        server.store.db, documents.document(documents.task(TASK, node("step", execution=execution)))
    )
    with server.store.db.connection_context():
        AppStore(server.store.db).add(
            WATCHER["bk_app_code"],
            WATCHER["bk_app_secret"],
            businesses=[documents.BUSINESS],
            may_assert_user=True,
        )
    watch = serve_watch(config, server)
    assert watch is not None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{watch.port}") as channel:
            yield server, channel
    finally:
        watch.stop(0)
        server.stop(None)


def _streams(channel: grpc.Channel, app: dict[str, str]) -> list[Any]:
    """A WatchTaskNode and a WatchTask stream as app, each past its first message."""
    stub = pb_grpc.TaskNodeServiceStub(channel)
    metadata = [("x-bkapi-authorization", json.dumps(app))]
    business = str(documents.BUSINESS)
    node_request = pb.GetTaskNodeDetailRequest(
        bk_biz_id=business, task_id=str(TASK), node_id="step"
    )
    streams = [
        stub.WatchTaskNode(
            pb.WatchTaskNodeRequest(node=node_request), metadata=metadata, timeout=30
        ),
        stub.WatchTask(
            pb.WatchTaskRequest(bk_biz_id=business, task_id=str(TASK)),
            metadata=metadata,
            timeout=30,
        ),
    ]
    for stream in streams:
        next(stream)
    return streams


def _ended(stream: Any) -> tuple[grpc.StatusCode, float]:
    """How stream ended, and when (time.monotonic()); heartbeats until then are read."""
    try:
        for _ in stream:
            pass
    except grpc.RpcError as error:
        return error.code(), time.monotonic()
    raise AssertionError("the stream ended with no status")


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda apps: apps.withdraw("watcher", [documents.BUSINESS]), "PERMISSION_DENIED"),
        (lambda apps: apps.revoke("watcher"), "UNAUTHENTICATED"),
        (lambda apps: apps.rotate("watcher", "another-secret"), "UNAUTHENTICATED"),
    ],
    ids=["grant withdrawn", "app revoked", "secret rotated"],
)
def test_a_caller_no_longer_let_in_has_its_streams_ended(
    watching: tuple[Server, grpc.Channel], change: Any, code: str
) -> None:
    server, channel = watching
    refused = _streams(channel, WATCHER)
    others = _streams(channel, ALL_APP)
    with server.store.db.connection_context():
        change(AppStore(server.store.db))
    changed = time.monotonic()
    for stream in refused:
        ended, at = _ended(stream)
        assert ended.name == code
        assert at - changed <= BOUND_SECONDS
    # Another app's streams go on: each still gets its heartbeats.
    for stream in others:
        message = next(stream)
        assert message.HasField("heartbeat_time")
        stream.cancel()


def test_a_caller_still_let_in_keeps_its_streams(watching: tuple[Server, grpc.Channel]) -> None:
    _, channel = watching
    streams = _streams(channel, WATCHER)
    until = time.monotonic() + 6 * CACHE_SECONDS
    for stream in streams:
        while time.monotonic() < until:  # heartbeats every 0.3 s, checks every 0.2 s
            assert next(stream).HasField("heartbeat_time")
        stream.cancel()


def test_a_grant_never_shows_its_credentials() -> None:
    """A stream's grant holds the caller's credentials to check them again; its repr (what
    a log line or a traceback would show) holds none of them."""
    grant = Grant((("x-bkapi-authorization", json.dumps(WATCHER)),), "ipv4:127.0.0.1:1", 900, False)
    assert WATCHER["bk_app_secret"] not in repr(grant)
    assert "x-bkapi-authorization" not in repr(grant)

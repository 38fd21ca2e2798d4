"""Watch streams (server.watch): WatchTaskNode and WatchTask against a real server.

A writer re-imports a task (tests.documents) while streams watch it; every store runs
it. The watch server polls every 0.05 s, heartbeats every 0.3 s.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes
from prometheus_client import REGISTRY

from server.app import Server
from server.app import create_server
from server.config import Config
from server.gateway.app import App
from server.gateway.local import LocalBackend
from server.gateway.protocol import Limits
from server.gateway.runner import HttpServer
from server.watch.service import WatchServer
from server.watch.service import serve_watch
from tests import documents
from tests.conftest import ALL_APP
from tests.conftest import DEMO_APP
from tests.documents import node

TASK = 810
INTERVAL = 0.05
HEARTBEAT = 0.3


def revision(n: int, state: str = "RUNNING") -> dict[str, Any]:
    """Task TASK whose node "step" is at revision n (its version says n)."""
    execution = {"state": state, "version": f"r{n}", "start_time": documents.STARTED}
    other = node("other", execution={"state": "FINISHED", "version": "x"})
    return documents.document(documents.task(TASK, node("step", execution=execution), other))


@pytest.fixture
def watching(demo_config: Config) -> Iterator[tuple[Server, WatchServer, grpc.Channel]]:
    config = dataclasses.replace(
        demo_config,
        watch_addr="127.0.0.1:0",
        watch_interval=INTERVAL,
        watch_heartbeat_seconds=HEARTBEAT,
        watch_max_streams=3,
    )
    server = create_server(config)
    server.start()
    documents.load(server.store.db, revision(0))
    watch = serve_watch(config, server)
    assert watch is not None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{watch.port}") as channel:
            yield server, watch, channel
    finally:
        watch.stop(0)
        server.stop(None)


def _stub(channel: grpc.Channel, app: dict[str, str] = ALL_APP) -> pb_grpc.TaskNodeServiceStub:
    return pb_grpc.TaskNodeServiceStub(channel)


def _meta(app: dict[str, str] = ALL_APP) -> list[tuple[str, str]]:
    return [("x-bkapi-authorization", json.dumps(app))]


def _node_request(token: str = "") -> pb.WatchTaskNodeRequest:
    return pb.WatchTaskNodeRequest(
        node=pb.GetTaskNodeDetailRequest(
            bk_biz_id=str(documents.BUSINESS), task_id=str(TASK), node_id="step"
        ),
        resume_token=token,
    )


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a failed call's google.rpc.Status."""
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info


def _queries(name: str) -> float:
    """Store reads of kind name so far in this process (server.metrics)."""
    value = REGISTRY.get_sample_value(
        "tasknode_store_query_duration_seconds_count", {"query": name}
    )
    return value or 0.0


def _opened(stub: pb_grpc.TaskNodeServiceStub, count: int) -> list[Any]:
    """count WatchTaskNode streams of the step node, each past its first message."""
    streams = [
        stub.WatchTaskNode(_node_request(), metadata=_meta(), timeout=10) for _ in range(count)
    ]
    for stream in streams:
        next(stream)
    return streams


def _details(stream: Any, count: int) -> list[pb.WatchTaskNodeResponse]:
    """The next count messages with a detail (heartbeats skipped)."""
    got = []
    for message in stream:
        if message.HasField("detail"):
            got.append(message)
            if len(got) == count:
                break
    return got


def test_first_message_is_the_detail_then_each_change_arrives(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    server, _, channel = watching
    stream = _stub(channel).WatchTaskNode(_node_request(), metadata=_meta(), timeout=10)
    first = _details(stream, 1)[0]
    assert first.detail.version == "r0" and first.detail.state == pb.NODE_STATE_RUNNING
    assert first.resume_token
    for n in (1, 2):
        documents.load(server.store.db, revision(n))
        changed = _details(stream, 1)[0]
        assert changed.detail.version == f"r{n}"
    documents.load(server.store.db, revision(3, "FINISHED"))
    final = _details(stream, 1)[0]
    assert final.detail.state == pb.NODE_STATE_FINISHED
    stream.cancel()


def test_a_change_to_another_node_sends_nothing_but_heartbeats(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    server, _, channel = watching
    stream = _stub(channel).WatchTaskNode(_node_request(), metadata=_meta(), timeout=10)
    first = next(stream)
    document = revision(0)
    document["tasks"][0]["nodes"][1]["execution"]["version"] = "y"  # only "other" changes
    documents.load(server.store.db, document)
    second = next(stream)
    assert second.HasField("heartbeat_time"), second
    assert second.resume_token == first.resume_token
    stream.cancel()


def test_resuming_gets_every_change_after_the_token_and_no_duplicate(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    server, _, channel = watching
    stub = _stub(channel)
    stream = stub.WatchTaskNode(_node_request(), metadata=_meta(), timeout=10)
    token = _details(stream, 1)[0].resume_token
    stream.cancel()
    # Nothing changed: a resumed stream sends no detail, only a heartbeat.
    resumed = stub.WatchTaskNode(_node_request(token), metadata=_meta(), timeout=10)
    assert next(resumed).HasField("heartbeat_time")
    resumed.cancel()
    # Changed while disconnected: the first message is the latest state.
    documents.load(server.store.db, revision(1))
    documents.load(server.store.db, revision(2))
    again = stub.WatchTaskNode(_node_request(token), metadata=_meta(), timeout=10)
    message = next(again)
    assert message.detail.version == "r2"
    again.cancel()


def test_a_token_of_another_watch_is_invalid(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    _, _, channel = watching
    stub = _stub(channel)
    stream = stub.WatchTask(
        pb.WatchTaskRequest(bk_biz_id=str(documents.BUSINESS), task_id=str(TASK)),
        metadata=_meta(),
        timeout=10,
    )
    token = next(stream).resume_token
    stream.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.WatchTaskNode(_node_request(token), metadata=_meta(), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_auth_and_errors_are_those_of_get_task_node_detail(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    _, _, channel = watching
    stub = _stub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.WatchTaskNode(_node_request(), timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.WatchTaskNode(_node_request(), metadata=_meta(DEMO_APP), timeout=10))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    request = _node_request()
    request.node.node_id = "missing"
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.WatchTaskNode(request, metadata=_meta(), timeout=10))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert info.reason == "NODE_NOT_FOUND"


def test_watch_task_lists_every_node_then_only_the_changed_ones(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    server, _, channel = watching
    stub = _stub(channel)
    request = pb.WatchTaskRequest(bk_biz_id=str(documents.BUSINESS), task_id=str(TASK))
    stream = stub.WatchTask(request, metadata=_meta(), timeout=10)
    first = next(stream)
    assert sorted(n.id for n in first.nodes) == ["other", "step"]
    documents.load(server.store.db, revision(1, "FAILED"))
    changed = next(m for m in stream if m.nodes)
    assert [(n.id, n.state) for n in changed.nodes] == [("step", pb.NODE_STATE_FAILED)]
    stream.cancel()
    # Resuming after the first message: only what changed since, once.
    resumed = stub.WatchTask(
        pb.WatchTaskRequest(
            bk_biz_id=str(documents.BUSINESS), task_id=str(TASK), resume_token=first.resume_token
        ),
        metadata=_meta(),
        timeout=10,
    )
    message = next(m for m in resumed if m.nodes)
    assert [n.id for n in message.nodes] == ["step"]
    assert next(resumed).HasField("heartbeat_time")
    resumed.cancel()


def test_streams_beyond_the_limit_are_refused_resource_exhausted(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    _, _, channel = watching
    stub = _stub(channel)
    streams = _opened(stub, 3)
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.WatchTaskNode(_node_request(), metadata=_meta(), timeout=10))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    streams[0].cancel()
    time.sleep(0.2)
    fourth = stub.WatchTaskNode(_node_request(), metadata=_meta(), timeout=10)
    assert next(fourth).HasField("detail")
    for stream in (*streams[1:], fourth):
        stream.cancel()


def test_one_poll_per_interval_whatever_the_number_of_streams(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    _, watch, channel = watching
    stub = _stub(channel)
    streams = _opened(stub, 3)
    stamps, reads = _queries("watch_stamps"), _queries("node")
    before, started = watch.hub.polls, time.monotonic()
    time.sleep(1.0)
    seconds = time.monotonic() - started
    polls = (watch.hub.polls - before) / seconds
    assert polls <= 1 / INTERVAL + 1
    # One statement a poll for all the streams, and no node read while nothing changes.
    assert (_queries("watch_stamps") - stamps) / seconds <= 1 / INTERVAL + 1
    assert _queries("node") == reads
    for stream in streams:
        stream.cancel()


def _never_reading(port: int, request: pb.WatchTaskNodeRequest) -> socket.socket:
    """A stream opened over raw HTTP/2 with a 100-byte window that is never opened
    further: after its first 100 bytes the server cannot write to it any more."""
    sock = socket.create_connection(("127.0.0.1", port))
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100})
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/bksops.tasknode.v1.TaskNodeService/WatchTaskNode"),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *_meta(),
        ],
    )
    body = request.SerializeToString()
    conn.send_data(stream_id, b"\x00" + struct.pack(">I", len(body)) + body, end_stream=True)
    sock.sendall(conn.data_to_send())
    sock.settimeout(0.5)
    try:  # the server's settings, acknowledged; then never another byte read
        conn.receive_data(sock.recv(65536))
        sock.sendall(conn.data_to_send())
    except TimeoutError:
        pass
    return sock


def test_a_reader_that_never_reads_holds_one_pending_message(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    server, watch, _ = watching
    sock = _never_reading(watch.port, _node_request())
    try:
        deadline = time.monotonic() + 10
        while not watch.servicer.mailboxes and time.monotonic() < deadline:
            time.sleep(0.01)
        changes = 40
        for n in range(1, changes + 1):
            documents.load(server.store.db, revision(n))
            time.sleep(INTERVAL * 1.5)
        (mailbox,) = watch.servicer.mailboxes
        # The stream's write is stuck on the window: every change after the first
        # replaced the one pending before it, and one is all the stream holds.
        assert mailbox.pending() == 1
        assert mailbox.coalesced >= changes // 2
        assert mailbox.detail is not None and mailbox.detail.version == f"r{changes}"
    finally:
        sock.close()


def test_draining_ends_streams_unavailable_with_the_token_to_resume(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    _, watch, channel = watching
    stream = _stub(channel).WatchTaskNode(_node_request(), metadata=_meta(), timeout=10)
    token = next(stream).resume_token
    threading.Thread(target=watch.stop, args=(1,)).start()
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "SHUTTING_DOWN"
    assert info.metadata["resumeToken"] == token


def test_the_unary_server_says_where_the_streams_are(
    watching: tuple[Server, WatchServer, grpc.Channel],
) -> None:
    server, watch, _ = watching
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        next(_stub(channel).WatchTaskNode(_node_request(), metadata=_meta(), timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    info = error_info(caught.value)
    assert info.reason == "WATCH_ON_WATCH_ADDR"
    # Configured as port 0: the address named is the port the watch server took.
    assert watch.port != 0
    assert info.metadata["watchAddr"] == f"127.0.0.1:{watch.port}"


@pytest.fixture
def shim(watching: tuple[Server, WatchServer, grpc.Channel]) -> Iterator[httpx.Client]:
    """An HTTP client of the shim in front of the watching server (in-process, as serve)."""
    server, watch, _ = watching
    config = Config(grpc_addr="127.0.0.1:0")
    app = App(
        config,
        LocalBackend(server.handlers, server.workers),
        watch_target=f"127.0.0.1:{watch.port}",
    )
    http = HttpServer(app, "127.0.0.1:0", grace=1, limits=Limits.of(config))
    http.start()
    try:
        with httpx.Client(
            base_url=http.url, timeout=10, headers={"X-Bkapi-Authorization": json.dumps(ALL_APP)}
        ) as client:
            yield client
    finally:
        http.stop()


NODE_PATH = f"/v1/businesses/{documents.BUSINESS}/tasks/{TASK}/nodes/step"


def test_http_streams_newline_delimited_json_as_grpc_gateway_does(
    watching: tuple[Server, WatchServer, grpc.Channel], shim: httpx.Client
) -> None:
    server = watching[0]
    with shim.stream("GET", NODE_PATH + ":watch") as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/x-ndjson"
        lines = answer.iter_lines()
        first = json.loads(next(lines))["result"]
        assert first["detail"]["version"] == "r0" and first["resumeToken"]
        documents.load(server.store.db, revision(1))
        for line in lines:
            result = json.loads(line)["result"]
            if "detail" in result:
                assert result["detail"]["version"] == "r1"
                break


def test_http_streams_server_sent_events_and_resumes_from_last_event_id(
    watching: tuple[Server, WatchServer, grpc.Channel], shim: httpx.Client
) -> None:
    server = watching[0]
    events = {"Accept": "text/event-stream"}
    with shim.stream("GET", NODE_PATH + ":watch", headers=events) as answer:
        assert answer.headers["content-type"] == "text/event-stream"
        lines = answer.iter_lines()
        token = next(lines).removeprefix("id: ")
        assert json.loads(next(lines).removeprefix("data: "))["detail"]["version"] == "r0"
    documents.load(server.store.db, revision(1))
    with shim.stream(
        "GET", NODE_PATH + ":watch", headers={**events, "Last-Event-ID": token}
    ) as answer:
        lines = answer.iter_lines()
        next(lines)
        assert json.loads(next(lines).removeprefix("data: "))["detail"]["version"] == "r1"


def test_http_watch_errors_are_answered_as_the_get_is(shim: httpx.Client) -> None:
    answer = shim.get(f"/v1/businesses/{documents.BUSINESS}/tasks/{TASK}/nodes/missing:watch")
    assert answer.status_code == 404
    assert answer.json()["details"][0]["reason"] == "NODE_NOT_FOUND"


def test_http_long_poll_answers_at_the_change_or_unchanged_at_the_end_of_the_wait(
    watching: tuple[Server, WatchServer, grpc.Channel], shim: httpx.Client
) -> None:
    server = watching[0]
    etag = shim.get(NODE_PATH).headers["etag"]
    started = time.monotonic()
    unchanged = shim.get(NODE_PATH, params={"wait": "0.5", "version": etag})
    assert time.monotonic() - started >= 0.5
    assert unchanged.status_code == 200 and unchanged.json()["version"] == "r0"
    threading.Timer(0.5, documents.load, (server.store.db, revision(1))).start()
    started = time.monotonic()
    changed = shim.get(NODE_PATH, params={"wait": "8s", "version": etag})
    assert time.monotonic() - started < 5
    assert changed.json()["version"] == "r1" and changed.headers["etag"] != etag


def test_http_streams_beyond_the_limit_are_refused_429(
    watching: tuple[Server, WatchServer, grpc.Channel], shim: httpx.Client
) -> None:
    stub = _stub(watching[2])
    streams = _opened(stub, 3)
    answer = shim.get(NODE_PATH + ":watch")
    assert answer.status_code == 429
    assert answer.json()["details"][0]["reason"] == "TOO_MANY_WATCH_STREAMS"
    for stream in streams:
        stream.cancel()

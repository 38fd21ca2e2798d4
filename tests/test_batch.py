"""BatchGetTaskNodeDetails and etags over a real gRPC server, on every store."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status
from peewee import Database

from server import nodes
from server import values
from server.app import Server
from server.cli import DEMO_APP
from server.config import Config
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.store import Store
from server.errors import DOMAIN
from server.gateway.local import LocalContext
from server.query import MAX_BATCH
from tests import documents
from tests.conftest import ALL_APP
from tests.conftest import SEED_NODE
from tests.conftest import seed_request

RUNNING_NODE = "node2b3c4d5e6f708192a3b4c5d6e7f8"
AUTH = (("x-bkapi-authorization", json.dumps(DEMO_APP)),)
WATCHED = "nodeetag000000000000000000000001"

#: One of each kind of outcome, for the demo app (granted business 2 only).
MIXED = [
    seed_request(),
    seed_request(task_id="99"),  # no such task
    seed_request(bk_biz_id="3", task_id="20"),  # a business not granted
    seed_request(node_id="", loop=0),  # bad arguments: two fields
    seed_request(node_id="nodenothere"),  # no such node
    seed_request(subprocess_stack=[]),  # the wrong stack: BadRequest names the parent
    seed_request(task_id="11", node_id=RUNNING_NODE, subprocess_stack=[]),
    seed_request(),  # the same node again
]


def single(stub: pb_grpc.TaskNodeServiceStub, request: pb.GetTaskNodeDetailRequest) -> Message:
    """What one GetTaskNodeDetail call gets: its NodeDetail, or its google.rpc.Status."""
    try:
        return stub.GetTaskNodeDetail(request, timeout=10)
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)
        assert status is not None
        return status


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details), status
    return info


def without_live_times(detail: pb.NodeDetail) -> pb.NodeDetail:
    """detail, its elapsed seconds cleared if it runs: they grow between two calls."""
    if detail.HasField("start_time") and not detail.HasField("finish_time"):
        detail.elapsed_seconds = 0
    return detail


def test_each_result_is_what_a_single_call_gets(stub: pb_grpc.TaskNodeServiceStub) -> None:
    reply = stub.BatchGetTaskNodeDetails(
        pb.BatchGetTaskNodeDetailsRequest(requests=MIXED), timeout=10
    )
    assert len(reply.results) == len(MIXED)
    kinds = [result.WhichOneof("result") for result in reply.results]
    assert kinds == ["detail", "error", "error", "error", "error", "error", "detail", "detail"]
    for request, result in zip(MIXED, reply.results, strict=True):
        expected = single(stub, request)
        if isinstance(expected, pb.NodeDetail):
            assert without_live_times(result.detail) == without_live_times(expected)
            assert result.detail.etag == expected.etag
        else:
            # The whole status: code, message and every detail (ErrorInfo, BadRequest).
            assert result.error == expected
            assert error_info(result.error).domain == DOMAIN
    codes = [(r.error.code, error_info(r.error).reason) for r in reply.results if r.error.code]
    assert codes == [
        (grpc.StatusCode.NOT_FOUND.value[0], "TASK_NOT_FOUND"),
        (grpc.StatusCode.PERMISSION_DENIED.value[0], "BUSINESS_NOT_GRANTED"),
        (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_ARGUMENT"),
        (grpc.StatusCode.NOT_FOUND.value[0], "NODE_NOT_FOUND"),
        (grpc.StatusCode.INVALID_ARGUMENT.value[0], "SUBPROCESS_STACK_MISMATCH"),
    ]


def test_results_keep_the_order_of_the_requests(stub: pb_grpc.TaskNodeServiceStub) -> None:
    ids = [SEED_NODE, "nodenothere", RUNNING_NODE]
    requests = [
        seed_request(node_id=ids[0]),
        seed_request(node_id=ids[1]),
        seed_request(task_id="11", node_id=ids[2], subprocess_stack=[]),
    ]
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0, 1, 0]):
        batch = pb.BatchGetTaskNodeDetailsRequest(requests=[requests[i] for i in order])
        reply = stub.BatchGetTaskNodeDetails(batch, timeout=10)
        shown = [
            r.detail.id if r.HasField("detail") else error_info(r.error).metadata["nodeId"]
            for r in reply.results
        ]
        assert shown == [ids[i] for i in order]


def test_a_full_batch_of_one_node_again_and_again(stub: pb_grpc.TaskNodeServiceStub) -> None:
    batch = pb.BatchGetTaskNodeDetailsRequest(requests=[seed_request()] * MAX_BATCH)
    reply = stub.BatchGetTaskNodeDetails(batch, timeout=30)
    assert len(reply.results) == MAX_BATCH
    assert {r.detail.SerializeToString() for r in reply.results} == {
        stub.GetTaskNodeDetail(seed_request(), timeout=10).SerializeToString()
    }


@pytest.mark.parametrize(
    ("count", "words"),
    [(0, "at least one request"), (MAX_BATCH + 1, f"at most {MAX_BATCH}")],
    ids=["empty", "over_the_limit"],
)
def test_a_malformed_batch_fails_whole(
    stub: pb_grpc.TaskNodeServiceStub, count: int, words: str
) -> None:
    batch = pb.BatchGetTaskNodeDetailsRequest(requests=[seed_request()] * count)
    with pytest.raises(grpc.RpcError) as caught:
        stub.BatchGetTaskNodeDetails(batch, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None and words in status.message
    info = error_info(status)
    assert (info.reason, info.domain, info.metadata["fields"]) == (
        "INVALID_ARGUMENT",
        DOMAIN,
        "requests",
    )
    bad = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad) for detail in status.details)
    assert [v.field for v in bad.field_violations] == ["requests"]


def test_a_batch_needs_credentials(channel: grpc.Channel) -> None:
    anonymous = pb_grpc.TaskNodeServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        anonymous.BatchGetTaskNodeDetails(
            pb.BatchGetTaskNodeDetailsRequest(requests=[seed_request()]), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def watched(outputs: dict[str, object]) -> dict[str, object]:
    """An import document with one finished node in business 900, with outputs."""
    return documents.document(documents.task(901, documents.node(WATCHED, outputs=outputs)))


def test_the_etag_changes_exactly_when_the_node_does(
    all_stub: pb_grpc.TaskNodeServiceStub, server: Server
) -> None:
    request = documents.request(901, WATCHED)
    documents.load(server.store.db, watched({"count": 1}))
    first = all_stub.GetTaskNodeDetail(request, timeout=10).etag
    assert first.startswith('"') and first.endswith('"') and len(first) == 34
    assert all_stub.GetTaskNodeDetail(request, timeout=10).etag == first  # from the cache
    documents.load(server.store.db, watched({"count": 2}))
    second = all_stub.GetTaskNodeDetail(request, timeout=10).etag
    assert second != first
    documents.load(server.store.db, watched({"count": 1}))  # the same content as at first
    assert all_stub.GetTaskNodeDetail(request, timeout=10).etag == first
    # The same node rendered another way is another reply, with its own tag.
    named = documents.request(901, WATCHED, component_code=documents.COMPONENT)
    assert all_stub.GetTaskNodeDetail(named, timeout=10).etag not in ("", first)


def test_a_running_node_has_a_weak_etag_that_holds_while_it_runs(
    stub: pb_grpc.TaskNodeServiceStub, server: Server
) -> None:
    request = seed_request(task_id="11", node_id=RUNNING_NODE, subprocess_stack=[])
    built = stub.GetTaskNodeDetail(request, timeout=10)
    assert built.etag.startswith('W/"')
    assert server.cache is not None
    server.cache.clear()  # rebuilt, at another moment: the same tag
    assert stub.GetTaskNodeDetail(request, timeout=10).etag == built.etag
    assert stub.GetTaskNodeDetail(seed_request(), timeout=10).etag.startswith('"')


def test_elapsed_seconds_of_what_runs_are_not_in_the_etag() -> None:
    running = pb.NodeDetail(id=RUNNING_NODE, state=pb.NODE_STATE_RUNNING, elapsed_seconds=5)
    running.start_time.FromSeconds(1_700_000_000)
    running.children.add(id="child", elapsed_seconds=3).start_time.FromSeconds(1_700_000_001)
    later = pb.NodeDetail()
    later.CopyFrom(running)
    later.elapsed_seconds, later.children[0].elapsed_seconds = 65, 63
    tags = [nodes._etag(d, True, [0]) for d in (running, later)]
    assert tags[0] == tags[1] and tags[0].startswith('W/"')
    assert (running.elapsed_seconds, running.children[0].elapsed_seconds) == (5, 3)  # kept
    finished = pb.NodeDetail()
    finished.CopyFrom(running)
    assert nodes._etag(finished, False, []) != nodes._etag(later, False, [])


def test_bytes_that_are_no_batch_are_invalid_argument(channel: grpc.Channel) -> None:
    path = "/bksops.tasknode.v1.TaskNodeService/BatchGetTaskNodeDetails"
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    # requests[0].node_id not UTF-8: the whole call is malformed, not one item.
    with pytest.raises(grpc.RpcError) as raised:
        call(b"\x0a\x04\x1a\x02\xff\xfe", metadata=AUTH, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)
    assert status is not None and error_info(status).reason == "MALFORMED_REQUEST"


def test_each_item_of_a_batch_reads_a_fresh_snapshot(config: Config) -> None:
    """What keeps a batch's items exact in the reply cache: an item's stamp is read before
    its snapshot begins (server.cache), so the snapshot of the item before must end."""
    db = open_database(config.database_url)
    ensure_schema(db)
    documents.load(db, watched({"count": 1}))
    store = Store(db)

    def reimport(outputs: dict[str, object]) -> None:  # on a connection of its own
        worker = threading.Thread(target=documents.load, args=(db, watched(outputs)))
        worker.start()
        worker.join(30)

    with store.session():
        assert store.find_node(documents.BUSINESS, False, 901, WATCHED).outputs == '{"count":1}'
        reimport({"count": 2})
        # Within one snapshot, the import is not seen; after end_snapshot, it is.
        assert store.find_node(documents.BUSINESS, False, 901, WATCHED).outputs == '{"count":1}'
        store.end_snapshot()
        assert store.find_node(documents.BUSINESS, False, 901, WATCHED).outputs == '{"count":2}'
    store.close()


class ReimportBeforeTheSecondItem(LocalContext):
    """An in-process call's context that, when the servicer checks the deadline before
    the batch's second item (its third check: the interceptor checks first), reimports
    WATCHED with count 2, as an import running alongside the batch would."""

    def __init__(self, db: Database) -> None:
        super().__init__((("x-bkapi-authorization", json.dumps(ALL_APP)),), time.monotonic() + 30)
        self.db = db
        self.checks = 0

    def time_remaining(self) -> float:
        self.checks += 1
        if self.checks == 3:
            worker = threading.Thread(target=documents.load, args=(self.db, watched({"count": 2})))
            worker.start()
            worker.join(30)
        return super().time_remaining()


def test_an_import_between_items_is_seen_and_not_cached_stale(
    server: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    other = documents.task(902, documents.node("nodeother00000000000000000000001"))
    documents.load(server.store.db, documents.document(other))
    documents.load(server.store.db, watched({"count": 1}))
    batch = pb.BatchGetTaskNodeDetailsRequest(
        requests=[
            documents.request(902, "nodeother00000000000000000000001"),  # begins a snapshot
            documents.request(901, WATCHED),
        ]
    )
    call = server.handlers[
        "/bksops.tasknode.v1.TaskNodeService/BatchGetTaskNodeDetails"
    ].unary_unary
    assert call is not None
    reply = call(batch, ReimportBeforeTheSecondItem(server.store.db))
    shown = reply.results[1].detail
    assert [(o.key, values.from_message(o.value)) for o in shown.outputs] == [("count", 2)]
    again = all_stub.GetTaskNodeDetail(documents.request(901, WATCHED), timeout=10)
    assert again.etag == shown.etag  # the cache holds what the batch built, and it is current

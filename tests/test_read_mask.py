"""read_mask (AIP-157) on GetTaskNodeDetail and BatchGetTaskNodeDetails, on every store:
only the fields asked for, validated, tagged as what is sent, and cheaper to serve."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.app import Server
from tests import documents
from tests.documents import attempt
from tests.documents import node
from tests.documents import request
from tests.documents import subprocess
from tests.test_query_budget import Statements
from tests.test_query_budget import tables

TASK = 710
STATE_AND_TIMES = ["state", "start_time", "finish_time", "elapsed_seconds"]
#: Inputs and outputs of about 200 KB each.
BIG = {f"key{i}": "x" * 1000 for i in range(200)}


def masked(call: pb.GetTaskNodeDetailRequest, *paths: str) -> pb.GetTaskNodeDetailRequest:
    with_mask = pb.GetTaskNodeDetailRequest()
    with_mask.CopyFrom(call)
    with_mask.read_mask.CopyFrom(FieldMask(paths=list(paths)))
    return with_mask


@pytest.fixture
def loaded(server: Server) -> Server:
    """A failed node with big inputs and outputs and three earlier attempts, a sub-process."""
    nodes = [
        node(
            "big",
            inputs=BIG,
            outputs=BIG,
            attempts=[attempt(1, r) for r in range(3)],
            ex_data="exit 2",
            execution={
                "state": "FAILED",
                "retry": 3,
                "version": "v9",
                "start_time": documents.STARTED,
                "finish_time": documents.FINISHED,
            },
        ),
        subprocess("sub", [node("child0"), node("child1")]),
    ]
    documents.load(server.store.db, documents.document(documents.task(TASK, *nodes)))
    return server


@pytest.fixture
def statements(loaded: Server) -> Iterator[Statements]:
    hook = Statements()
    loaded.store.db.query_hooks.append(hook)
    yield hook
    loaded.store.db.query_hooks.remove(hook)


def present(detail: pb.NodeDetail) -> set[str]:
    return {field.name for field, _ in detail.ListFields()}


def test_only_the_fields_asked_for_are_returned(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    call = request(TASK, "big", component_code=documents.COMPONENT)
    full = all_stub.GetTaskNodeDetail(call, timeout=10)
    assert {"inputs", "outputs", "histories", "ex_data"} <= present(full)
    for paths in (
        STATE_AND_TIMES,
        ["ex_data", "retry"],
        ["outputs"],
        ["histories", "inputs", "id"],
    ):
        part = all_stub.GetTaskNodeDetail(masked(call, *paths), timeout=10)
        assert present(part) <= {*paths, "etag"}, paths
        for name in paths:
            assert getattr(part, name) == getattr(full, name), name
    # Unset optional fields stay unset: a finished node asked for its ex_data has none.
    sub = all_stub.GetTaskNodeDetail(
        masked(request(TASK, "sub"), "ex_data", "children"), timeout=10
    )
    assert not sub.HasField("ex_data") and [c.id for c in sub.children] == ["child0", "child1"]


@pytest.mark.parametrize("paths", [[], ["*"]], ids=["empty", "star"])
def test_an_empty_mask_or_a_star_returns_everything(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub, paths: list[str]
) -> None:
    call = request(TASK, "big")
    full = all_stub.GetTaskNodeDetail(call, timeout=10)
    assert all_stub.GetTaskNodeDetail(masked(call, *paths), timeout=10) == full


@pytest.mark.parametrize(
    ("paths", "field", "words"),
    [
        (["state", "nosuch"], "read_mask.paths[1]", "no field of NodeDetail"),
        (["inputs.fields"], "read_mask.paths[0]", "nested"),
        (["state", "*"], "read_mask.paths[1]", '"*" must be the only path'),
        (["startTime"], "read_mask.paths[0]", "no field of NodeDetail"),
    ],
    ids=["unknown", "nested", "star_among_others", "json_name"],
)
def test_a_bad_mask_is_invalid_argument_naming_the_path(
    loaded: Server,
    all_stub: pb_grpc.TaskNodeServiceStub,
    paths: list[str],
    field: str,
    words: str,
) -> None:
    call = masked(request(TASK, "big"), *paths)
    with pytest.raises(grpc.RpcError) as caught:
        all_stub.GetTaskNodeDetail(call, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None and words in status.message
    bad = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad) for detail in status.details)
    assert [v.field for v in bad.field_violations] == [field]
    # In a batch, the same status for that item alone.
    reply = all_stub.BatchGetTaskNodeDetails(
        pb.BatchGetTaskNodeDetailsRequest(requests=[call, request(TASK, "big")]), timeout=10
    )
    assert reply.results[0].error == status and reply.results[1].HasField("detail")


def test_a_partial_reply_has_its_own_etag(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    call = request(TASK, "big")
    full = all_stub.GetTaskNodeDetail(call, timeout=10)
    times = all_stub.GetTaskNodeDetail(masked(call, *STATE_AND_TIMES), timeout=10)
    assert times.etag.startswith('"') and times.etag not in ("", full.etag)
    # The same mask in another order is the same reply; from the cache or rebuilt alike.
    again = all_stub.GetTaskNodeDetail(masked(call, *reversed(STATE_AND_TIMES)), timeout=10)
    assert again == times
    assert loaded.cache is not None
    loaded.cache.clear()
    assert all_stub.GetTaskNodeDetail(masked(call, *STATE_AND_TIMES), timeout=10) == times
    # A mask naming every field that is set sends the full reply's bytes, under another tag.
    every = masked(call, *(f.name for f, _ in full.ListFields() if f.name != "etag"))
    whole = all_stub.GetTaskNodeDetail(every, timeout=10)
    assert whole.etag != full.etag
    whole.etag = full.etag
    assert whole == full
    # The full reply is not served from the partial one's cache entry, nor the reverse.
    assert all_stub.GetTaskNodeDetail(call, timeout=10) == full


def test_a_running_node_without_its_elapsed_time_has_a_strong_etag(
    server: Server, stub: pb_grpc.TaskNodeServiceStub
) -> None:
    running = pb.GetTaskNodeDetailRequest(
        bk_biz_id="2", task_id="11", node_id="node2b3c4d5e6f708192a3b4c5d6e7f8"
    )
    assert stub.GetTaskNodeDetail(masked(running, *STATE_AND_TIMES), timeout=10).etag.startswith(
        'W/"'
    )
    still = stub.GetTaskNodeDetail(masked(running, "state", "start_time"), timeout=10)
    assert still.state == pb.NODE_STATE_RUNNING and still.etag.startswith('"')
    assert still.elapsed_seconds == 0 and not still.HasField("finish_time")


def test_a_state_and_times_read_skips_the_heavy_reads(
    statements: Statements, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    """A state-and-times read selects no inputs, outputs or ex_data column and no
    attempts or children; the full read of the same node does."""
    statements.of(all_stub, request(TASK, "child0", stack=("sub",)))  # warm-up
    call = request(TASK, "big")
    part, part_sql = statements.of(all_stub, masked(call, *STATE_AND_TIMES))
    full, full_sql = statements.of(all_stub, call)
    assert part.state == full.state == pb.NODE_STATE_FAILED
    assert tables(part_sql) == (["task"], ["project"])
    assert tables(full_sql) == (["task"], sorted(["project", "attempt"]))
    node_read = next(sql for sql in part_sql if "node" in sql and "project" in sql)
    assert "inputs" not in node_read and "ex_data" not in node_read
    sub, sub_sql = statements.of(all_stub, masked(request(TASK, "sub"), "state"))
    assert sub.state == pb.NODE_STATE_FINISHED and tables(sub_sql) == (["task"], ["project"])
    # Asking for the children or histories reads them, and only them.
    _, children_sql = statements.of(all_stub, masked(request(TASK, "sub"), "children"))
    assert tables(children_sql) == (["task"], sorted(["project", "node"]))
    _, histories_sql = statements.of(all_stub, masked(call, "histories"))
    assert tables(histories_sql) == (["task"], sorted(["project", "attempt"]))


def test_a_mask_does_not_change_the_errors(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    call = masked(request(TASK, "big", component_code="nosuchcomponent"), "state")
    with pytest.raises(grpc.RpcError) as caught:
        all_stub.GetTaskNodeDetail(call, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_older_loop_under_a_mask_shows_that_loop(
    server: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    looped = node(
        "looped",
        attempts=[attempt(1, 0), attempt(1, 1, state="FINISHED", version="final1")],
        execution={"state": "FINISHED", "loop": 2, "version": "v2"},
    )
    documents.load(server.store.db, documents.document(documents.task(TASK + 1, looped)))
    call = request(TASK + 1, "looped")
    call.loop = 1
    full = all_stub.GetTaskNodeDetail(call, timeout=10)
    part = all_stub.GetTaskNodeDetail(masked(call, "version", "loop"), timeout=10)
    assert (part.version, part.loop) == (full.version, full.loop) == ("final1", 1)

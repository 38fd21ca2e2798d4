"""ListTaskNodes over a real gRPC server, on every store: order, pages and their tokens,
sub-processes, filters, views and authorization."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.app import Server
from server.config import Config
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.store import MAX_LISTING_SHAPES
from server.db.store import Store
from server.query import DEFAULT_PAGE_SIZE
from server.query import MAX_FULL_PAGE_SIZE
from tests import documents
from tests.documents import node
from tests.documents import subprocess

TASK = 720
LATE = {"start_time": "2024-06-01T00:00:00Z", "finish_time": "2024-06-01T00:00:05Z"}


def tree(r1_state: str = "FAILED") -> dict[str, Any]:
    """A task of ten nodes, two sub-processes deep; stored breadth first."""
    inner = subprocess("inner", [node("i0"), node("i1", execution=None)])
    sub = subprocess(
        "sub",
        [
            node("c0", execution={"state": "RUNNING", "start_time": documents.STARTED}),
            node("c1", execution={"state": "FINISHED", "retry": 1, **LATE}),
            inner,
        ],
    )
    nodes = [
        node("r0"),
        node("r1", execution={"state": r1_state, "retry": 2, **LATE}),
        sub,
        node("r2", execution=None),
        node(
            "r3",
            component={"code": "other"},
            execution={"state": "FINISHED", "loop": 3, "start_time": documents.STARTED},
        ),
    ]
    return documents.document(documents.task(TASK, *nodes))


#: The stored order: the root's nodes, then each sub-process's children.
ORDER = ["r0", "r1", "sub", "r2", "r3", "c0", "c1", "inner", "i0", "i1"]


@pytest.fixture
def loaded(server: Server) -> Server:
    documents.load(server.store.db, tree())
    return server


def listing(**fields: Any) -> pb.ListTaskNodesRequest:
    return pb.ListTaskNodesRequest(bk_biz_id=str(documents.BUSINESS), task_id=str(TASK), **fields)


def ids(reply: pb.ListTaskNodesResponse) -> list[str]:
    return [n.id for n in reply.nodes]


def walk(stub: pb_grpc.TaskNodeServiceStub, request: pb.ListTaskNodesRequest) -> list[str]:
    """Every node of a listing, page after page."""
    seen: list[str] = []
    while True:
        reply = stub.ListTaskNodes(request, timeout=10)
        seen += ids(reply)
        if not reply.next_page_token:
            return seen
        assert reply.nodes, "a page with a next token holds nodes"
        request.page_token = reply.next_page_token


def failure(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    """(code, ErrorInfo reason, BadRequest fields) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    status = rpc_status.from_call(caught.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    for detail in status.details:
        detail.Unpack(info) or detail.Unpack(bad)
    return caught.value.code(), info.reason, [v.field for v in bad.field_violations]


def test_the_whole_task_in_stored_order(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    reply = all_stub.ListTaskNodes(listing(), timeout=10)
    assert ids(reply) == ORDER and reply.total_size == len(ORDER)
    assert not reply.next_page_token
    by_id = {n.id: n for n in reply.nodes}
    assert list(by_id["i0"].subprocess_stack) == ["sub", "inner"]
    assert by_id["r2"].state == pb.NODE_STATE_READY and not by_id["r2"].executed
    assert (by_id["r1"].state, by_id["r1"].retry) == (pb.NODE_STATE_FAILED, 2)
    assert by_id["r3"].component_code == "other" and by_id["r3"].loop == 3


def test_the_summary_view_holds_only_the_summary(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    reply = all_stub.ListTaskNodes(listing(filter="retry >= 1"), timeout=10)
    fields = {f.name for n in reply.nodes for f, _ in n.ListFields()}
    assert fields <= {
        "id",
        "name",
        "state",
        "executed",
        "start_time",
        "finish_time",
        "loop",
        "retry",
        "component_code",
        "subprocess_stack",
    }
    assert {"id", "name", "state", "start_time", "retry"} <= fields


def test_pages_cover_the_listing_once(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    for size in (1, 3, 4, 9, 10):
        assert walk(all_stub, listing(page_size=size)) == ORDER, size
    first = all_stub.ListTaskNodes(listing(page_size=4), timeout=10)
    assert first.total_size == len(ORDER) and len(first.nodes) == 4
    # The page size may change between pages.
    rest = all_stub.ListTaskNodes(
        listing(page_size=100, page_token=first.next_page_token), timeout=10
    )
    assert ids(first) + ids(rest) == ORDER and not rest.next_page_token


def test_the_children_of_a_sub_process(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    reply = all_stub.ListTaskNodes(listing(subprocess_stack=["sub"]), timeout=10)
    assert ids(reply) == ["c0", "c1", "inner"] and reply.total_size == 3
    assert walk(all_stub, listing(subprocess_stack=["sub"], page_size=1)) == ["c0", "c1", "inner"]
    nested = listing(subprocess_stack=["sub", "inner"], page_size=1)
    assert walk(all_stub, nested) == ["i0", "i1"]


@pytest.mark.parametrize(
    ("stack", "code", "reason", "fields"),
    [
        (
            ["inner"],
            grpc.StatusCode.INVALID_ARGUMENT,
            "SUBPROCESS_STACK_MISMATCH",
            ["subprocess_stack"],
        ),
        (["r0"], grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", ["subprocess_stack[0]"]),
        (["nothere"], grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND", []),
        (
            ["bad id!"],
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SUBPROCESS_STACK",
            ["subprocess_stack[0]"],
        ),
    ],
    ids=["wrong_stack", "no_sub_process", "no_such_node", "malformed"],
)
def test_a_bad_sub_process(
    loaded: Server,
    all_stub: pb_grpc.TaskNodeServiceStub,
    stack: list[str],
    code: grpc.StatusCode,
    reason: str,
    fields: list[str],
) -> None:
    request = listing(subprocess_stack=stack)
    assert failure(lambda: all_stub.ListTaskNodes(request, timeout=10)) == (code, reason, fields)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("state = FAILED", ["r1"]),
        ("state = NODE_STATE_RUNNING", ["c0"]),
        ("state = READY", ["r2", "i1"]),
        ("state != FINISHED", ["r1", "r2", "c0", "i1"]),
        ('component_code = "other"', ["r3"]),
        ('component_code != "test_component"', ["sub", "r3", "inner"]),
        ("loop > 1", ["r3"]),
        ("retry >= 1", ["r1", "c1"]),
        ("retry = 0 AND loop <= 1", ["r0", "sub", "r2", "c0", "inner", "i0", "i1"]),
        ('started_at > "2024-05-15T00:00:00Z"', ["r1", "c1"]),
        (
            'start_time < "2024-05-15T00:00:00+08:00" AND '
            'finish_time = "2024-05-01T10:00:07+08:00"',
            ["r0", "sub", "inner", "i0"],
        ),
        ('finished_at >= "2024-06-01T00:00:05Z" AND state = FINISHED', ["c1"]),
        ("  ", ORDER),
    ],
)
def test_filters(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub, text: str, expected: list[str]
) -> None:
    reply = all_stub.ListTaskNodes(listing(filter=text), timeout=10)
    assert ids(reply) == expected and reply.total_size == len(expected)
    assert walk(all_stub, listing(filter=text, page_size=1)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "state > FAILED",
        "state = DONE",
        "loop > one",
        'loop > "1"',
        "component_code = other",
        "started_at > 2024",
        'started_at > "2024-01-01"',
        "name = x",
        "loop > 1 OR retry > 1",
        "loop > 1 and retry > 1",
        "NOT loop > 1",
        "(loop > 1)",
        "loop >",
        " AND ".join(["loop > 1"] * 11),
        "x" * 1001,
    ],
)
def test_a_bad_filter_is_invalid_argument(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub, text: str
) -> None:
    request = listing(filter=text)
    assert failure(lambda: all_stub.ListTaskNodes(request, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        ["filter"],
    )


def test_a_token_is_refused_for_another_query(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    token = all_stub.ListTaskNodes(listing(page_size=2), timeout=10).next_page_token
    assert token and "=" not in token and "/" not in token and "+" not in token
    for other in (
        listing(page_token=token, filter="loop >= 1"),
        listing(page_token=token, view=pb.NODE_VIEW_FULL),
        listing(page_token=token, subprocess_stack=["sub"]),
        listing(page_token=token, scope=pb.SCOPE_PROJECT),
    ):
        assert failure(lambda r=other: all_stub.ListTaskNodes(r, timeout=10)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            ["page_token"],
        )
    for forged in ("nonsense", token[:-3], "W10", "x" * 600, "WzEsIngiLCJ5Iiwibm9kZSJd"):
        request = listing(page_token=forged)
        assert failure(lambda r=request: all_stub.ListTaskNodes(r, timeout=10))[2] == ["page_token"]


def test_a_token_stays_valid_while_the_task_changes(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    first = all_stub.ListTaskNodes(listing(page_size=4), timeout=10)
    # A new import of the task (r1 retried and finished) stores every node row anew, after
    # the rows of another task: each node's row id is now another (on every store).
    other = documents.task(TASK + 1, *(node(f"o{i}") for i in range(20)))
    documents.load(loaded.store.db, documents.document(other))
    documents.load(loaded.store.db, tree(r1_state="FINISHED"))
    rest = walk(all_stub, listing(page_size=4, page_token=first.next_page_token))
    assert ids(first) + rest == ORDER
    children = all_stub.ListTaskNodes(listing(subprocess_stack=["sub"], page_size=1), timeout=10)
    documents.load(loaded.store.db, tree(r1_state="FAILED"))
    after = walk(all_stub, listing(subprocess_stack=["sub"], page_token=children.next_page_token))
    assert ids(children) + after == ["c0", "c1", "inner"]


def test_page_sizes(server: Server, all_stub: pb_grpc.TaskNodeServiceStub) -> None:
    many = [node(f"n{i:03}") for i in range(MAX_FULL_PAGE_SIZE + 20)]
    documents.load(server.store.db, documents.document(documents.task(TASK, *many)))
    reply = all_stub.ListTaskNodes(listing(), timeout=10)
    assert len(reply.nodes) == DEFAULT_PAGE_SIZE and reply.next_page_token
    assert reply.total_size == len(many)
    full = all_stub.ListTaskNodes(listing(view=pb.NODE_VIEW_FULL, page_size=10_000), timeout=30)
    assert len(full.nodes) == MAX_FULL_PAGE_SIZE
    assert len(all_stub.ListTaskNodes(listing(page_size=10_000), timeout=10).nodes) == len(many)
    request = listing(page_size=-1)
    assert failure(lambda: all_stub.ListTaskNodes(request, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        ["page_size"],
    )


def test_the_full_view_is_what_get_returns(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    reply = all_stub.ListTaskNodes(listing(view=pb.NODE_VIEW_FULL, page_size=4), timeout=10)
    assert ids(reply) == ORDER[:4]
    for detail in reply.nodes:
        get = pb.GetTaskNodeDetailRequest(
            bk_biz_id=str(documents.BUSINESS),
            task_id=str(TASK),
            node_id=detail.id,
            subprocess_stack=list(detail.subprocess_stack),
        )
        single = all_stub.GetTaskNodeDetail(get, timeout=10)
        assert detail.etag == single.etag and detail.etag
        if not detail.etag.startswith("W/"):
            assert detail == single
    assert any(n.id == "sub" and n.children for n in reply.nodes)


def test_errors_and_authorization_as_for_get(
    loaded: Server, stub: pb_grpc.TaskNodeServiceStub, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    # The demo app may read business 2 only: 900 is refused whether or not the task exists.
    for task in (str(TASK), "99999"):
        request = pb.ListTaskNodesRequest(bk_biz_id=str(documents.BUSINESS), task_id=task)
        code, reason, _ = failure(lambda r=request: stub.ListTaskNodes(r, timeout=10))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "BUSINESS_NOT_GRANTED")
    request = listing()
    request.task_id = "99999"
    assert failure(lambda: all_stub.ListTaskNodes(request, timeout=10))[:2] == (
        grpc.StatusCode.NOT_FOUND,
        "TASK_NOT_FOUND",
    )
    bad = pb.ListTaskNodesRequest(bk_biz_id="x", task_id="", view=7)  # type: ignore[arg-type]
    assert failure(lambda: all_stub.ListTaskNodes(bad, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        ["bk_biz_id", "task_id", "view"],
    )
    # The demo's own task, as the demo app, by project id too.
    demo = stub.ListTaskNodes(pb.ListTaskNodesRequest(bk_biz_id="2", task_id="11"), timeout=10)
    by_project = pb.ListTaskNodesRequest(bk_biz_id="1", task_id="11", scope=pb.SCOPE_PROJECT)
    assert ids(stub.ListTaskNodes(by_project, timeout=10)) == ids(demo) != []


def test_listing_needs_credentials(channel: grpc.Channel) -> None:
    anonymous = pb_grpc.TaskNodeServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        anonymous.ListTaskNodes(pb.ListTaskNodesRequest(bk_biz_id="2", task_id="11"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_read_mask_on_the_full_view_is_get_with_that_mask(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    mask = FieldMask(paths=["id", "state", "start_time", "histories"])
    request = listing(view=pb.NODE_VIEW_FULL, read_mask=mask, page_size=3)
    reply = all_stub.ListTaskNodes(request, timeout=10)
    assert ids(reply) == ORDER[:3]
    for detail in reply.nodes:
        assert {f.name for f, _ in detail.ListFields()} <= {*mask.paths, "etag"}
        get = pb.GetTaskNodeDetailRequest(
            bk_biz_id=str(documents.BUSINESS), task_id=str(TASK), node_id=detail.id, read_mask=mask
        )
        assert all_stub.GetTaskNodeDetail(get, timeout=10) == detail
    # The token is for this mask: another mask is another query.
    other = listing(
        view=pb.NODE_VIEW_FULL,
        read_mask=FieldMask(paths=["state"]),
        page_token=reply.next_page_token,
    )
    assert failure(lambda: all_stub.ListTaskNodes(other, timeout=10))[2] == ["page_token"]
    same = listing(
        view=pb.NODE_VIEW_FULL, read_mask=mask, page_size=3, page_token=reply.next_page_token
    )
    assert ids(all_stub.ListTaskNodes(same, timeout=10)) == ORDER[3:6]


@pytest.mark.parametrize(
    ("view", "paths", "field"),
    [
        (pb.NODE_VIEW_BASIC, ["state"], "read_mask"),
        (pb.NODE_VIEW_UNSPECIFIED, ["state"], "read_mask"),
        (pb.NODE_VIEW_FULL, ["state", "nosuch"], "read_mask.paths[1]"),
    ],
    ids=["basic", "unspecified", "unknown_path"],
)
def test_a_bad_read_mask_on_a_listing(
    loaded: Server,
    all_stub: pb_grpc.TaskNodeServiceStub,
    view: pb.NodeView,
    paths: list[str],
    field: str,
) -> None:
    request = listing(view=view, read_mask=FieldMask(paths=paths))
    assert failure(lambda: all_stub.ListTaskNodes(request, timeout=10))[2] == [field]
    # "*" (or an empty mask) is every field: the summary view takes it.
    star = listing(read_mask=FieldMask(paths=["*"]))
    assert ids(all_stub.ListTaskNodes(star, timeout=10)) == ORDER


def test_filters_of_many_shapes_keep_a_bounded_number_of_prepared_queries(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    ops = ["=", "!=", "<", "<=", ">", ">="]
    shapes = [f"loop {a} 1 AND retry {b} 0 AND loop {c} 2" for a in ops for b in ops for c in ops]
    assert 2 * len(shapes) > MAX_LISTING_SHAPES  # a list and a count shape each
    for text in shapes:
        all_stub.ListTaskNodes(listing(filter=text), timeout=10)
    assert len(loaded.store._listings) <= MAX_LISTING_SHAPES
    # Past the bound, a new shape still answers (built for its call alone).
    reply = all_stub.ListTaskNodes(
        listing(filter="loop > 2 AND loop > 2 AND retry < 9"), timeout=10
    )
    assert ids(reply) == ["r3"]


@pytest.mark.parametrize(
    ("key", "bound", "plan"),
    [
        (
            ("list", False, True, ()),
            {"task_id": 1, "after": 5, "task_again": 1, "after_node": "n", "limit": 51},
            "SEARCH t1 USING INDEX node_task_id (task_id=? AND rowid>?)",
        ),
        (
            ("list", True, True, ()),
            {"task_id": 1, "parent": "p", "after": 5, "limit": 51},
            "SEARCH t1 USING INDEX node_task_id_parent_node_id_position "
            "(task_id=? AND parent_node_id=? AND position>?)",
        ),
    ],
    ids=["whole_task", "sub_process"],
)
def test_a_later_page_is_one_index_range_scan_on_sqlite(
    sqlite_config: Config, key: tuple[Any, ...], bound: dict[str, object], plan: str
) -> None:
    """Why the last page of a big task costs what the first does: SQLite starts the page's
    scan at the token's position in an index that is already in the listing's order (no
    sort of the task's nodes; see bench.list_nodes for the times)."""
    db = open_database(sqlite_config.database_url)
    ensure_schema(db)
    store = Store(db)
    with store.session():
        prepared = store._listing(key, ())
        params = prepared.params.copy()
        for name, position in prepared.positions:
            params[position] = bound[name]
        steps = [row[-1] for row in db.execute_sql("EXPLAIN QUERY PLAN " + prepared.sql, params)]
    store.close()
    assert steps[0] == plan and not any("TEMP B-TREE" in step for step in steps), steps

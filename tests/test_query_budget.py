"""One GetTaskNodeDetail costs the same few SQL statements however much data a node has.

The statements are counted where peewee sends them (its query hooks see every
execute_sql of the server's database): each SELECT, named by the table it reads,
and the BEGIN and ROLLBACK of the call's read snapshot. Not counted, since they are
no per-call statements: a pooled connection's opening (once per connection),
SQLite's PRAGMAs when it opens its file, and the credential lookups the
authenticator makes once per app per cache period (the warm-up call pays them).

A first call for a node reads the task's stamp on its own, then, in one read
snapshot, the node (business, task and node in one join), its attempts in the
current loop, and the output schema (a component_code was given) or the children
(a sub-process): four SELECTs. A repeated call finds the stamp unchanged and
reuses the reply built before (server.cache): one SELECT and no transaction.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from peewee import QueryEvent

from server.app import Server
from tests import documents
from tests.documents import attempt
from tests.documents import node
from tests.documents import request
from tests.documents import subprocess

TASK = 700
STAMP = ["task"]
BUILT = (STAMP, sorted(["project", "attempt", "component_schema"]))
REUSED: tuple[list[str], list[str]] = (STAMP, [])
#: The table a statement reads (peewee names it t1 in every query), or the statement.
TABLE = re.compile(r"FROM [`\"](\w+)[`\"] AS [`\"]t1[`\"]")


def history(count: int) -> list[dict[str, object]]:
    return [attempt(1, retry, inputs={"retry": retry}) for retry in range(count)]


@pytest.fixture
def loaded(server: Server) -> Server:
    """The server, with nodes of 0, 10 and 1,000 histories and a sub-process of 200 children."""
    children = [node(f"child{i}") for i in range(200)]
    nodes = [
        node("h0"),
        node("h10", attempts=history(10), execution={"state": "FINISHED", "retry": 10}),
        node("h1000", attempts=history(1000), execution={"state": "FINISHED", "retry": 1000}),
        subprocess("sub", children),
    ]
    documents.load(server.store.db, documents.document(documents.task(TASK, *nodes)))
    return server


class Statements:
    """The SQL the server's database executes, as peewee's query hook sees it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[str] = []

    def __call__(self, event: QueryEvent) -> None:
        with self.lock:
            self.seen.append(event.sql)

    def of(
        self, stub: pb_grpc.TaskNodeServiceStub, call: pb.GetTaskNodeDetailRequest
    ) -> tuple[pb.NodeDetail, list[str]]:
        """The reply to call and the statements that served it."""
        with self.lock:
            self.seen.clear()
        detail = stub.GetTaskNodeDetail(call, timeout=10)
        with self.lock:
            return detail, list(self.seen)


@pytest.fixture
def statements(loaded: Server) -> Iterator[Statements]:
    hook = Statements()
    loaded.store.db.query_hooks.append(hook)
    yield hook
    loaded.store.db.query_hooks.remove(hook)


def tables(sql: list[str]) -> tuple[list[str], list[str]]:
    """(tables read on their own in order, tables read inside the one read snapshot sorted)."""
    alone: list[str] = []
    inside: list[str] = []
    in_snapshot = False
    for statement in sql:
        if statement.startswith(("BEGIN", "START TRANSACTION")):
            assert not in_snapshot and not inside, f"a second snapshot: {sql}"
            in_snapshot = True
        elif statement == "ROLLBACK":
            assert in_snapshot, sql
            in_snapshot = False
        else:
            match = TABLE.search(statement)
            assert match, statement
            (inside if in_snapshot else alone).append(match.group(1))
    assert not in_snapshot, f"the snapshot was not ended: {sql}"
    return alone, sorted(inside)


def test_histories_do_not_add_queries(
    statements: Statements, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    statements.of(all_stub, request(TASK, "child0", stack=("sub",)))  # warm-up
    for node_id, histories in (("h0", 0), ("h10", 10), ("h1000", 1000)):
        call = request(TASK, node_id, component_code=documents.COMPONENT)
        built, built_sql = statements.of(all_stub, call)
        reused, reused_sql = statements.of(all_stub, call)
        assert len(built.histories) == len(reused.histories) == histories
        assert [o.key for o in built.outputs][:2] == ["count", "_result"]
        assert (tables(built_sql), tables(reused_sql)) == (BUILT, REUSED), node_id


def test_children_do_not_add_queries(
    statements: Statements, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    statements.of(all_stub, request(TASK, "h0"))  # warm-up
    detail, sql = statements.of(all_stub, request(TASK, "sub"))
    assert len(detail.children) == 200
    assert tables(sql) == (STAMP, sorted(["project", "attempt", "node"]))
    child, child_sql = statements.of(all_stub, request(TASK, "child7", stack=("sub",)))
    assert child.id == "child7"
    assert tables(child_sql) == (STAMP, sorted(["project", "attempt"])), "no schema, no children"


def test_a_batch_of_a_tasks_nodes_reads_its_stamp_once(
    statements: Statements, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    """A batch's nodes of one task share the task's stamp: read once for the whole call."""
    nodes = [("h0", ()), ("h10", ()), ("child3", ("sub",)), ("child4", ("sub",))]
    batch = pb.BatchGetTaskNodeDetailsRequest(
        requests=[request(TASK, node_id, stack=stack) for node_id, stack in nodes]
    )
    statements.of(all_stub, request(TASK, "h1000"))  # warm-up
    for _ in range(2):  # built, then reused from the cache
        with statements.lock:
            statements.seen.clear()
        reply = all_stub.BatchGetTaskNodeDetails(batch, timeout=10)
        with statements.lock:
            sql = list(statements.seen)
        assert [r.detail.id for r in reply.results] == [node_id for node_id, _ in nodes]
        stamps = [s for s in sql if TABLE.search(s) and TABLE.search(s).group(1) == "task"]  # type: ignore[union-attr]
        assert len(stamps) == 1, sql

"""Exact values through each real database: imported, stored, read back, served.

tests/test_values.py proves the JSON text and the JsonValue message exact; this
proves no database changes the text on its way in and out (PostgreSQL TEXT,
MariaDB LONGTEXT in utf8mb4, SQLite TEXT): every kind, key order, unicode and a
megabyte, compared by type as well as value.
"""

from __future__ import annotations

from typing import Any

import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server import values
from server.app import Server
from server.db.store import Store
from tests import documents
from tests.documents import attempt
from tests.documents import node
from tests.documents import request
from tests.test_values import KINDS
from tests.test_values import same

TASK = 600
#: About a megabyte of text either way: one ASCII, one three bytes a character in UTF-8.
BIG = {"ascii": "x" * 1_000_000, "cjk": "执行结果" * 90_000, "lines": list(range(1000))}


@pytest.fixture
def loaded(server: Server) -> Server:
    """The server, with a node whose inputs, outputs and earlier attempt hold every kind."""
    kinds = dict(KINDS)
    nodes = [
        node(
            "kinds",
            inputs=kinds,
            outputs=kinds,
            attempts=[attempt(1, 0, inputs=kinds, outputs=kinds)],
            execution={"state": "FINISHED", "retry": 1},
        ),
        node("big", inputs={"big": BIG}, outputs={"big": BIG}),
    ]
    documents.load(server.store.db, documents.document(documents.task(TASK, *nodes)))
    return server


def test_every_kind_reads_back_exactly_from_the_store(loaded: Server) -> None:
    store = Store(loaded.store.db)
    with store.session():
        row = store.find_node(documents.BUSINESS, False, TASK, "kinds")
        (earlier,) = store.attempts(TASK, "kinds", 1)
        big = store.find_node(documents.BUSINESS, False, TASK, "big")
    for text in (row.inputs, row.outputs, earlier.inputs, earlier.outputs):
        assert same(values.loads(text), KINDS)
    assert same(values.loads(big.outputs), {"big": BIG})


def test_every_kind_is_served_exactly(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    detail = all_stub.GetTaskNodeDetail(request(TASK, "kinds"), timeout=10)
    served: dict[str, Any] = {o.key: values.from_message(o.value) for o in detail.outputs}
    assert same(served, KINDS)
    assert same(values.object_from_message(detail.inputs), KINDS)
    (earlier,) = detail.histories
    assert same(values.object_from_message(earlier.inputs), KINDS)
    assert same(values.object_from_message(earlier.outputs), KINDS)


def test_a_megabyte_value_is_served_exactly(
    loaded: Server, all_stub: pb_grpc.TaskNodeServiceStub
) -> None:
    detail = all_stub.GetTaskNodeDetail(request(TASK, "big"), timeout=10)
    (output,) = detail.outputs
    assert same(values.from_message(output.value), BIG)
    assert same(values.object_from_message(detail.inputs), {"big": BIG})

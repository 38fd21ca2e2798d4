"""Import documents built in code, for tests that need data of a particular shape.

Everything lives in business 900 (project 900), which only ALL_APP may read.
"""

from __future__ import annotations

from typing import Any

from bksops.tasknode.v1 import task_node_pb2 as pb
from peewee import Database

from server.db.loader import FORMAT
from server.db.loader import load_document

BUSINESS = 900
COMPONENT = "test_component"
STARTED = "2024-05-01T10:00:00+08:00"
FINISHED = "2024-05-01T10:00:07+08:00"


def document(*tasks: dict[str, Any]) -> dict[str, Any]:
    """A whole import file: business 900, one component schema, and the tasks."""
    return {
        "format": FORMAT,
        "projects": [{"id": BUSINESS, "name": "Test business", "bk_biz_id": BUSINESS}],
        "components": [
            {
                "code": COMPONENT,
                "version": "legacy",
                "outputs": [{"key": "count", "name": "count"}, {"key": "_result", "name": "ok"}],
            }
        ],
        "tasks": list(tasks),
    }


def task(task_id: int, *nodes: dict[str, Any]) -> dict[str, Any]:
    return {"id": task_id, "project_id": BUSINESS, "name": f"task {task_id}", "nodes": list(nodes)}


def node(node_id: str, **fields: Any) -> dict[str, Any]:
    """A ServiceActivity of COMPONENT that finished at version "v1"; fields override."""
    record: dict[str, Any] = {
        "id": node_id,
        "name": f"node {node_id}",
        "type": "ServiceActivity",
        "component": {"code": COMPONENT},
        "inputs": {},
        "outputs": {},
        "execution": {
            "state": "FINISHED",
            "version": "v1",
            "start_time": STARTED,
            "finish_time": FINISHED,
        },
    }
    record.update(fields)
    return record


def subprocess(node_id: str, children: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A SubProcess node that finished, with its children."""
    record = node(node_id, type="SubProcess", children=children, **fields)
    del record["component"]
    return record


def attempt(loop: int, retry: int, **fields: Any) -> dict[str, Any]:
    """An earlier, failed attempt; fields override."""
    record: dict[str, Any] = {
        "loop": loop,
        "retry": retry,
        "version": f"a{loop}.{retry}",
        "start_time": STARTED,
        "finish_time": FINISHED,
        "ex_data": "exit 1",
    }
    record.update(fields)
    return record


def load(db: Database, file: dict[str, Any]) -> None:
    """Load file into db on a connection of this thread's own."""
    with db.connection_context():
        load_document(db, file)


def request(
    task_id: int, node_id: str, stack: tuple[str, ...] = (), component_code: str = ""
) -> pb.GetTaskNodeDetailRequest:
    """A GetTaskNodeDetail request for a node of business 900."""
    return pb.GetTaskNodeDetailRequest(
        bk_biz_id=str(BUSINESS),
        task_id=str(task_id),
        node_id=node_id,
        subprocess_stack=list(stack),
        component_code=component_code,
    )

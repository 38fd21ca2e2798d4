"""An engine-run task as an import record (docs/import-format.md), from the bk-sops store.

Every node of the task's tree (read from its execution snapshot, independently of the
store) becomes a NODE record holding what BksopsStore reads for it: the runtime state,
the engine's history ids, a null name, the outputs a root constant renames, and null
outputs where the engine keeps no execution data. A task loaded from such a record must
answer exactly as the engine-read one (tests/engine/test_bksops_store.py).
"""

from __future__ import annotations

import datetime
import json
import zlib
from typing import Any

from server import values
from server.db.bksops import BksopsStore
from server.db.store import AttemptRow
from server.db.store import NodeRow

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def tree_of(snapshot: bytes) -> list[tuple[str, list[Any]]]:
    """(node id, children) of the root pipeline of a zlib web tree, in tree order."""
    return _pipeline(json.loads(zlib.decompress(snapshot)))


def _pipeline(pipeline: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    nodes: list[tuple[str, list[Any]]] = [(pipeline["start_event"]["id"], [])]
    for activity in pipeline["activities"].values():
        inner = _pipeline(activity["pipeline"]) if activity["type"] == "SubProcess" else []
        nodes.append((activity["id"], inner))
    nodes.extend((gateway["id"], []) for gateway in pipeline.get("gateways", {}).values())
    nodes.append((pipeline["end_event"]["id"], []))
    return nodes


def task_record(
    store: BksopsStore,
    business_id: int,
    task_id: int,
    name: str,
    project_id: int,
    tree: list[tuple[str, list[Any]]],
) -> dict[str, Any]:
    """The import record of the task, read through store (in a session of its own)."""
    with store.session():
        nodes = [_node(store, business_id, task_id, node_id, inner) for node_id, inner in tree]
        root = store.find_node(business_id, False, task_id, tree[0][0]).root_id
    return {
        "id": task_id,
        "project_id": project_id,
        "name": name,
        "pipeline_id": root,
        "nodes": nodes,
    }


def _node(
    store: BksopsStore, business_id: int, task_id: int, node_id: str, inner: list[Any]
) -> dict[str, Any]:
    row = store.find_node(business_id, False, task_id, node_id)
    record: dict[str, Any] = {
        "id": node_id,
        "name": None if row.name_null else row.name,
        "type": row.kind,
        "error_ignorable": row.error_ignorable,
        "inputs": values.loads(row.inputs),
        "outputs": values.loads(row.outputs),
        "ex_data": row.ex_data,
    }
    if row.component_code:
        record["component"] = {"code": row.component_code, "version": row.component_version}
    if row.renamed:
        record["renamed"] = dict(row.renamed)
    if row.state is not None:
        record["execution"] = _execution(row)
        record["attempts"] = [
            _attempt(a)
            for loop in range(1, row.loop + 1)
            for a in store.attempts(task_id, node_id, loop)
        ]
    if inner:
        # The native store lists a sub-process's children by position: the engine's
        # order (its state rows) first, then those that have not run.
        ran = [child.node_id for child in store.children(task_id, node_id)]
        order = {child: i for i, child in enumerate(ran)}
        ordered = sorted(inner, key=lambda entry: order.get(entry[0], len(order)))
        record["children"] = [
            _node(store, business_id, task_id, child, grand) for child, grand in ordered
        ]
    return record


def _execution(row: NodeRow) -> dict[str, Any]:
    execution: dict[str, Any] = {
        "state": row.state,
        "loop": row.loop,
        "retry": row.retry,
        "skip": row.skip,
        "error_ignored": row.error_ignored,
        "version": row.version,
    }
    if row.started_at is not None:
        execution["start_time"] = _iso(row.started_at)
    if row.finished_at is not None:
        execution["finish_time"] = _iso(row.finished_at)
    return execution


def _attempt(row: AttemptRow) -> dict[str, Any]:
    assert row.started_at is not None and row.finished_at is not None
    record: dict[str, Any] = {
        "id": row.id,
        "loop": row.loop,
        "retry": row.retry,
        "skip": row.skip,
        "version": row.version,
        "start_time": _iso(row.started_at),
        "finish_time": _iso(row.finished_at),
        "inputs": values.loads(row.inputs),
        "outputs": values.loads(row.outputs),
        "ex_data": row.ex_data,
    }
    if row.state is not None:
        record["state"] = row.state
    return record


def _iso(micros: int) -> str:
    return (_EPOCH + datetime.timedelta(microseconds=micros)).isoformat()

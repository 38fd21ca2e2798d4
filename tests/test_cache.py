"""Reusing built replies: only while the task and the catalog are unchanged."""

from __future__ import annotations

import copy
import json
import time
from importlib import resources
from typing import Any

import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.app import Server
from server.cache import DetailCache
from server.db.loader import load_document
from server.query import parse_request
from tests.conftest import seed_request

RUNNING_NODE = "node2b3c4d5e6f708192a3b4c5d6e7f8"
CANARY = "nodebbb1c2d3e4f5061728394a5b6c7d"


@pytest.fixture
def demo() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        resources.files("server.db").joinpath("demo.json").read_text(encoding="utf-8")
    )
    return document


def reload(server: Server, document: dict[str, Any]) -> None:
    with server.store.db.connection_context():
        load_document(server.store.db, document)


def test_a_second_call_is_answered_from_the_cache(
    stub: pb_grpc.TaskNodeServiceStub, server: Server
) -> None:
    assert server.cache is not None and len(server.cache) == 0
    first = stub.GetTaskNodeDetail(seed_request(), timeout=5)
    assert len(server.cache) == 1
    stored = server.cache.get(parse_request(seed_request()), server_stamp(server, 10))
    assert stored == first
    assert stub.GetTaskNodeDetail(seed_request(), timeout=5) == first
    assert len(server.cache) == 1


def server_stamp(server: Server, task_id: int) -> object:
    with server.store.db.connection_context():
        return server.store.stamp(task_id, "")


def test_the_cache_is_bounded_by_bytes() -> None:
    cache = DetailCache(max_bytes=3000)
    detail = pb.NodeDetail(id="n", name="x" * 1000)
    for key in range(5):
        cache.put(key, "stamp", detail, None, ())
    assert len(cache) == 2
    assert cache.get(4, "stamp") is detail and cache.get(0, "stamp") is None
    assert cache.get(4, "other stamp") is None


def test_a_reimported_task_is_seen_at_once(
    stub: pb_grpc.TaskNodeServiceStub, server: Server, demo: dict[str, Any]
) -> None:
    before = stub.GetTaskNodeDetail(seed_request(), timeout=5)
    changed = copy.deepcopy(demo)
    seed = changed["tasks"][0]["nodes"][1]["children"][0]
    seed["outputs"]["job_inst_id"] = 999
    seed["execution"]["version"] = "f" * 32
    reload(server, changed)
    after = stub.GetTaskNodeDetail(seed_request(), timeout=5)
    assert before.version != after.version == "f" * 32
    assert after.outputs[0].value.int_value == 999


def test_a_changed_schema_is_seen_at_once(
    stub: pb_grpc.TaskNodeServiceStub, server: Server, demo: dict[str, Any]
) -> None:
    assert stub.GetTaskNodeDetail(seed_request(), timeout=5).outputs[1].name == "link"
    renamed = copy.deepcopy(demo)
    renamed["components"][0]["outputs"][1]["name"] = "JOB link"
    reload(server, renamed)
    assert stub.GetTaskNodeDetail(seed_request(), timeout=5).outputs[1].name == "JOB link"


def test_a_moved_task_is_not_served_from_its_old_business(
    all_stub: pb_grpc.TaskNodeServiceStub, server: Server, demo: dict[str, Any]
) -> None:
    assert all_stub.GetTaskNodeDetail(seed_request(), timeout=5).id
    moved = copy.deepcopy(demo)
    moved["projects"][0]["bk_biz_id"] = 7
    reload(server, moved)
    with pytest.raises(Exception, match="does not exist"):
        all_stub.GetTaskNodeDetail(seed_request(), timeout=5)
    assert all_stub.GetTaskNodeDetail(seed_request(bk_biz_id="7"), timeout=5).id


def test_cached_running_nodes_keep_counting(stub: pb_grpc.TaskNodeServiceStub) -> None:
    request = seed_request(task_id="11", node_id=RUNNING_NODE, subprocess_stack=[])
    first = stub.GetTaskNodeDetail(request, timeout=5)
    time.sleep(1.1)
    second = stub.GetTaskNodeDetail(request, timeout=5)
    assert second.elapsed_seconds >= first.elapsed_seconds + 1
    parent = seed_request(node_id=CANARY, component_code="")
    a = stub.GetTaskNodeDetail(parent, timeout=5)
    time.sleep(1.1)
    b = stub.GetTaskNodeDetail(parent, timeout=5)
    assert b.children[1].elapsed_seconds >= a.children[1].elapsed_seconds + 1
    assert b.children[0].elapsed_seconds == a.children[0].elapsed_seconds == 22


def test_errors_are_not_cached(
    all_stub: pb_grpc.TaskNodeServiceStub, server: Server, demo: dict[str, Any]
) -> None:
    request = seed_request(node_id="nodelater", subprocess_stack=[])
    with pytest.raises(Exception, match="not found"):
        all_stub.GetTaskNodeDetail(request, timeout=5)
    grown = copy.deepcopy(demo)
    grown["tasks"][0]["nodes"].append({"id": "nodelater", "name": "Added later"})
    reload(server, grown)
    assert all_stub.GetTaskNodeDetail(request, timeout=5).name == "Added later"

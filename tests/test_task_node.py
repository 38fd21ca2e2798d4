"""GetTaskNodeDetail over a real gRPC server: behaviour and errors."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server import values
from server.app import Server
from server.db.loader import load_document
from server.errors import DOMAIN
from tests.conftest import SEED_NODE
from tests.conftest import SEED_PARENT
from tests.conftest import seed_request
from tests.golden_files import assert_golden

CANARY = "nodebbb1c2d3e4f5061728394a5b6c7d"
FAILED_NODE = "nodef1a2b3c4d5e6f708192a3b4c5d6e"
RUNNING_NODE = "node2b3c4d5e6f708192a3b4c5d6e7f8"
NOT_RUN_NODE = "node3c4d5e6f708192a3b4c5d6e7f809"
LOOP_NODE = "node4d5e6f708192a3b4c5d6e7f8091a"
STATS_NODE = "node5e6f708192a3b4c5d6e7f8091a2b"


def maintenance(node_id: str, **fields: object) -> pb.GetTaskNodeDetailRequest:
    """A request for a node of task 11 (all at the root)."""
    fields.setdefault("subprocess_stack", [])
    return seed_request(task_id="11", node_id=node_id, **fields)


def outputs(detail: pb.NodeDetail) -> list[tuple[str, str, object, bool]]:
    return [(o.key, o.name, values.from_message(o.value), o.preset) for o in detail.outputs]


def test_seed_node_matches_the_golden_file(stub: pb_grpc.TaskNodeServiceStub) -> None:
    reply = stub.GetTaskNodeDetail(seed_request(), timeout=5)
    assert_golden(
        "seed_node_detail",
        json_format.MessageToDict(reply, always_print_fields_with_no_presence=True),
    )


def test_seed_node_is_the_documented_example(stub: pb_grpc.TaskNodeServiceStub) -> None:
    reply = stub.GetTaskNodeDetail(seed_request(), timeout=5)
    assert reply.state == pb.NODE_STATE_FINISHED
    assert reply.start_time.ToJsonString() == "2019-01-17T14:02:37Z"
    assert reply.finish_time.ToJsonString() == "2019-01-17T14:02:46Z"
    assert (reply.elapsed_seconds, reply.loop, reply.retry, reply.skip) == (9, 1, 0, False)
    assert reply.version == "23ac8c29f62b3337aafcf1f538d277f8"
    assert not reply.HasField("ex_data")
    assert reply.history_id == -1
    assert list(values.object_from_message(reply.inputs)) == [
        "job_account",
        "job_script_timeout",
        "job_script_source",
        "job_script_list_public",
        "job_content",
        "job_script_type",
        "job_script_param",
        "job_script_list_general",
        "job_ip_list",
    ]
    assert outputs(reply) == [
        ("job_inst_id", "task ID", 407584, True),
        ("job_inst_url", "link", "", True),
        ("_result", "result", True, True),
    ]
    assert (reply.component_code, list(reply.subprocess_stack)) == (
        "job_fast_execute_script",
        [SEED_PARENT],
    )


def test_outputs_without_component_code_are_raw_and_unnamed(
    stub: pb_grpc.TaskNodeServiceStub,
) -> None:
    reply = stub.GetTaskNodeDetail(seed_request(component_code=""), timeout=5)
    assert outputs(reply) == [
        ("job_inst_id", "", 407584, False),
        ("job_inst_url", "", "", False),
        ("_result", "", True, False),
    ]


def test_outputs_of_every_kind(stub: pb_grpc.TaskNodeServiceStub) -> None:
    reply = stub.GetTaskNodeDetail(maintenance(STATS_NODE, component_code="bk_collect_stats"))
    table = outputs(reply)
    assert table[:9] == [
        ("count", "Count", 42, True),
        ("big_count", "Big count", 9007199254740993, True),
        ("ratio", "Ratio", 0.375, True),
        ("healthy", "Healthy", True, True),
        ("summary", "Summary", "all services up", True),
        ("owner", "Owner", None, True),
        ("hosts", "Hosts", ["127.0.0.1", "127.0.0.2"], True),
        (
            "detail",
            "Detail",
            {
                "cpu": {"max": 0.92, "avg": 0.41},
                "disks": [{"mount": "/", "free_gb": 120}],
                "ok": True,
            },
            True,
        ),
        ("report_url", "Report link", "", True),
    ]
    assert table[9:] == [("_loop", "_loop", 1, False)]
    kinds = [o.value.WhichOneof("kind") for o in reply.outputs]
    assert kinds[:4] == ["int_value", "int_value", "double_value", "bool_value"]
    assert reply.elapsed_seconds == 2  # 1.5 s rounds to even


def test_failed_node_has_its_earlier_attempts(stub: pb_grpc.TaskNodeServiceStub) -> None:
    reply = stub.GetTaskNodeDetail(maintenance(FAILED_NODE), timeout=5)
    assert (reply.state, reply.retry, reply.elapsed_seconds) == (pb.NODE_STATE_FAILED, 2, 5)
    assert reply.ex_data == "job 407600 failed: exit code 1 on 127.0.0.1 (password=******)"
    assert [(h.retry, h.state, h.elapsed_seconds) for h in reply.histories] == [
        (0, pb.NODE_STATE_FAILED, 3),
        (1, pb.NODE_STATE_FAILED, 2),  # no stored state: a retried attempt had failed
    ]
    first = reply.histories[0]
    assert first.ex_data == "job 407598 failed: exit code 1 on 127.0.0.1 (password=******)"
    assert first.node_id == FAILED_NODE
    assert values.object_from_message(first.outputs) == {"job_inst_id": 407598, "_result": False}
    assert first.history_id > 0 and reply.histories[1].history_id > first.history_id


@pytest.mark.parametrize(("keep", "retries"), [(0, []), (1, [1]), (2, [0, 1]), (50, [0, 1])])
def test_max_histories_keeps_the_last(
    stub: pb_grpc.TaskNodeServiceStub, keep: int, retries: list[int]
) -> None:
    reply = stub.GetTaskNodeDetail(maintenance(FAILED_NODE, max_histories=keep), timeout=5)
    assert [h.retry for h in reply.histories] == retries


def test_running_node_counts_up_to_now(stub: pb_grpc.TaskNodeServiceStub) -> None:
    started = int(datetime.fromisoformat("2026-11-26T02:11:00+08:00").timestamp())
    before = round(time.time() - started)
    reply = stub.GetTaskNodeDetail(maintenance(RUNNING_NODE), timeout=5)
    after = round(time.time() - started)
    assert reply.state == pb.NODE_STATE_RUNNING
    assert reply.start_time.seconds == started
    assert not reply.HasField("finish_time")
    assert before <= reply.elapsed_seconds <= after


def test_node_that_has_not_run_is_ready(stub: pb_grpc.TaskNodeServiceStub) -> None:
    reply = stub.GetTaskNodeDetail(maintenance(NOT_RUN_NODE, component_code="pause_node"))
    assert (reply.state, reply.executed) == (pb.NODE_STATE_READY, False)
    assert reply.name == "Approve the maintenance window"
    assert reply.error_ignorable is True
    assert values.object_from_message(reply.inputs) == {
        "description": "Approve tonight's window?",
        "notify": ["ops", "dba"],
    }
    assert outputs(reply) == [("_result", "result", "", True)]
    assert reply.HasField("ex_data") and reply.ex_data == ""
    assert not reply.HasField("start_time") and not reply.histories and reply.version == ""


def test_current_loop_shows_its_own_attempts(stub: pb_grpc.TaskNodeServiceStub) -> None:
    for request in (
        maintenance(LOOP_NODE),
        maintenance(LOOP_NODE, loop=3),
        maintenance(LOOP_NODE, loop=7),
    ):
        reply = stub.GetTaskNodeDetail(request, timeout=5)
        assert (reply.loop, reply.history_id, len(reply.histories)) == (3, -1, 0)
        assert reply.version.endswith("0004")


def test_older_loop_shows_its_final_attempt(stub: pb_grpc.TaskNodeServiceStub) -> None:
    reply = stub.GetTaskNodeDetail(maintenance(LOOP_NODE, loop=2), timeout=5)
    assert (reply.state, reply.loop, reply.elapsed_seconds) == (pb.NODE_STATE_FINISHED, 2, 30)
    assert reply.version.endswith("0003")
    assert reply.history_id > 0
    assert values.object_from_message(reply.inputs) == {"bk_timing": "30", "attempt": 2}
    assert [(h.loop, h.retry, h.state) for h in reply.histories] == [(2, 0, pb.NODE_STATE_FAILED)]
    assert reply.histories[0].ex_data == "health check returned 503"
    first = stub.GetTaskNodeDetail(maintenance(LOOP_NODE, loop=1), timeout=5)
    assert (first.loop, first.version[-4:], len(first.histories)) == (1, "0001", 0)


def test_subprocess_lists_its_direct_children(stub: pb_grpc.TaskNodeServiceStub) -> None:
    reply = stub.GetTaskNodeDetail(seed_request(node_id=CANARY, component_code=""), timeout=5)
    assert [(c.id, c.state) for c in reply.children] == [
        ("nodeccc2d3e4f5a6b7c8d9e0f1a2b3c4", pb.NODE_STATE_FINISHED),
        ("nodeddd3e4f5a6b7c8d9e0f1a2b3c4d5", pb.NODE_STATE_RUNNING),
    ]
    assert reply.children[0].elapsed_seconds == 22


def test_nested_two_levels_deep(stub: pb_grpc.TaskNodeServiceStub) -> None:
    node = "nodeddd3e4f5a6b7c8d9e0f1a2b3c4d5"
    reply = stub.GetTaskNodeDetail(
        seed_request(node_id=node, subprocess_stack=[SEED_PARENT, CANARY], component_code=""),
        timeout=5,
    )
    assert (reply.id, list(reply.subprocess_stack)) == (node, [SEED_PARENT, CANARY])
    top = stub.GetTaskNodeDetail(
        seed_request(node_id=SEED_PARENT, subprocess_stack=[], component_code=""), timeout=5
    )
    assert [c.id for c in top.children] == [SEED_NODE, CANARY]


def test_scope_project_reads_the_project_id(stub: pb_grpc.TaskNodeServiceStub) -> None:
    reply = stub.GetTaskNodeDetail(seed_request(bk_biz_id="1", scope=pb.SCOPE_PROJECT))
    assert reply.id == SEED_NODE


# Errors ------------------------------------------------------------------------------


def error_of(
    stub: pb_grpc.TaskNodeServiceStub, request: pb.GetTaskNodeDetailRequest
) -> tuple[grpc.StatusCode, str, dict[str, str], list[str], str]:
    """(code, ErrorInfo reason, metadata, BadRequest fields, message) of a failing call."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTaskNodeDetail(request, timeout=5)
    error = caught.value
    status = rpc_status.from_call(error)
    assert status is not None, "every error carries google.rpc.Status details"
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    found = set()
    for detail in status.details:
        if detail.Unpack(info):
            found.add("info")
        elif detail.Unpack(bad):
            found.add("bad")
    assert "info" in found and info.domain == DOMAIN
    fields = [v.field for v in bad.field_violations]
    return error.code(), info.reason, dict(info.metadata), fields, error.details() or ""


INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_", "code", "reason", "fields"),
    [
        (seed_request(bk_biz_id=""), INVALID, "INVALID_ARGUMENT", ["bk_biz_id"]),
        (seed_request(bk_biz_id="two"), INVALID, "INVALID_ARGUMENT", ["bk_biz_id"]),
        (seed_request(task_id="-1"), INVALID, "INVALID_ARGUMENT", ["task_id"]),
        (seed_request(task_id="1" * 19), INVALID, "INVALID_ARGUMENT", ["task_id"]),
        (seed_request(node_id=""), INVALID, "INVALID_ARGUMENT", ["node_id"]),
        (seed_request(node_id="a b"), INVALID, "INVALID_ARGUMENT", ["node_id"]),
        (seed_request(component_code="x y"), INVALID, "INVALID_ARGUMENT", ["component_code"]),
        (seed_request(loop=0), INVALID, "INVALID_LOOP", ["loop"]),
        (seed_request(loop=-3), INVALID, "INVALID_LOOP", ["loop"]),
        (seed_request(max_histories=-1), INVALID, "INVALID_ARGUMENT", ["max_histories"]),
        (
            seed_request(subprocess_stack=[""]),
            INVALID,
            "INVALID_SUBPROCESS_STACK",
            ["subprocess_stack[0]"],
        ),
        (seed_request(subprocess_stack=["x"] * 33), INVALID, "INVALID_SUBPROCESS_STACK", None),
        (seed_request(scope=9), INVALID, "INVALID_ARGUMENT", ["scope"]),
        (
            seed_request(bk_biz_id="", task_id="x", node_id=""),
            INVALID,
            "INVALID_ARGUMENT",
            ["bk_biz_id", "task_id", "node_id"],
        ),
        (seed_request(bk_biz_id="99"), NOT_FOUND, "BUSINESS_NOT_FOUND", []),
        (seed_request(task_id="99"), NOT_FOUND, "TASK_NOT_FOUND", []),
        (seed_request(task_id="12"), NOT_FOUND, "TASK_NOT_FOUND", []),
        (seed_request(bk_biz_id="3"), NOT_FOUND, "TASK_NOT_FOUND", []),
        (seed_request(node_id="nodenothere"), NOT_FOUND, "NODE_NOT_FOUND", []),
        (seed_request(component_code="no_such_plugin"), NOT_FOUND, "COMPONENT_NOT_FOUND", []),
        (maintenance(LOOP_NODE, loop=0), INVALID, "INVALID_LOOP", ["loop"]),
        (
            seed_request(subprocess_stack=[]),
            INVALID,
            "SUBPROCESS_STACK_MISMATCH",
            ["subprocess_stack"],
        ),
        (
            seed_request(subprocess_stack=[CANARY]),
            INVALID,
            "SUBPROCESS_STACK_MISMATCH",
            ["subprocess_stack"],
        ),
        (
            maintenance(FAILED_NODE, subprocess_stack=[SEED_PARENT]),
            INVALID,
            "SUBPROCESS_STACK_MISMATCH",
            ["subprocess_stack"],
        ),
    ],
)
def test_errors_have_a_code_and_a_reason(
    all_stub: pb_grpc.TaskNodeServiceStub,
    request_: pb.GetTaskNodeDetailRequest,
    code: grpc.StatusCode,
    reason: str,
    fields: Sequence[str] | None,
) -> None:
    got_code, got_reason, _, got_fields, message = error_of(all_stub, request_)
    assert (got_code, got_reason) == (code, reason)
    if fields is not None:
        assert got_fields == list(fields)
    assert "Traceback" not in message and "Exception" not in message


def test_wrong_stack_names_the_expected_parent(stub: pb_grpc.TaskNodeServiceStub) -> None:
    _, _, metadata, _, message = error_of(stub, seed_request(subprocess_stack=[]))
    assert metadata["expectedParent"] == SEED_PARENT
    assert SEED_PARENT in message


def test_an_older_loop_with_no_record_is_not_found(
    stub: pb_grpc.TaskNodeServiceStub, server: Server
) -> None:
    # A node in loop 4 whose attempts of loops 1 and 2 were never recorded.
    node = {
        "id": "nodegap0000000000000000000000000",
        "name": "Gappy loop",
        "execution": {
            "state": "FINISHED",
            "loop": 4,
            "version": "v4",
            "start_time": "2026-11-26T03:00:00+08:00",
            "finish_time": "2026-11-26T03:00:01+08:00",
        },
        "attempts": [
            {
                "loop": 3,
                "version": "v3",
                "state": "FINISHED",
                "start_time": "2026-11-26T02:59:00+08:00",
                "finish_time": "2026-11-26T02:59:01+08:00",
            }
        ],
    }
    load_into(server, {"id": 13, "project_id": 1, "name": "gap", "nodes": [node]})
    request = seed_request(task_id="13", node_id=node["id"], subprocess_stack=[], loop=2)
    code, reason, metadata, _, message = error_of(stub, request)
    assert (code, reason) == (NOT_FOUND, "LOOP_NOT_FOUND")
    assert metadata == {"nodeId": node["id"], "loop": "2", "currentLoop": "4"}
    assert message == f"node {node['id']} has no record of loop 2; its current loop is 4"
    request.loop = 3
    older = stub.GetTaskNodeDetail(request, timeout=5)
    assert (older.loop, older.version, len(older.histories)) == (3, "v3", 0)


def load_into(server: Server, task: dict[str, object]) -> None:
    """Load one more task into the running server's database."""
    db = server.store.db
    with db.connection_context():
        load_document(db, {"format": "tasknode-import/1", "tasks": [task]})


def test_unknown_business_message_is_the_legacy_one(
    all_stub: pb_grpc.TaskNodeServiceStub,
) -> None:
    *_, message = error_of(all_stub, seed_request(bk_biz_id="99"))
    assert message == "project(99) with scope(cmdb_biz) does not exist."

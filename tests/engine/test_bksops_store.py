"""GetTaskNodeDetail served from a database the real engine wrote (the bk-sops store).

A real server reads each store's engine database (tests/engine/conftest.py) with
TASKNODE_BKSOPS_DATABASE_URL set, its own database holding only the app and the
plugins' schemas. The expected answers are what bk-sops computes by its rules
(../shared/reference/bk-sops.md §2) from the rows the manifest describes; the engine's
own ids, versions and times are read off its tables and must come back unchanged.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import pickle
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import httpx
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from peewee import MySQLDatabase

from server import traces
from server import values
from server.app import Server
from server.app import create_server
from server.config import Config
from server.db.apps import AppStore
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.connection import open_read_only
from server.db.loader import FORMAT
from server.db.loader import load_document
from server.gateway.local import LocalBackend
from tests.conftest import ALL_APP
from tests.conftest import authorized
from tests.engine import reference
from tests.engine.conftest import EngineDatabase
from tests.engine.harness import run_pipelines
from tests.engine.to_import import tree_of
from tests.gateway.conftest import running_shim

GATE_CLOSED = "gate closed: ok is false"


@pytest.fixture(scope="module")
def served(
    engine_database: EngineDatabase, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[pb_grpc.TaskNodeServiceStub, EngineDatabase]]:
    """A started server on the engine's database, and a stub calling as ALL_APP."""
    with serving(engine_database, tmp_path_factory.mktemp("own")) as (stub, _):
        yield stub, engine_database


@pytest.fixture(scope="module")
def legacy(
    engine_database: EngineDatabase, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[httpx.Client, EngineDatabase]]:
    """An HTTP client of the shim (in-process, as `make run`) in front of a server on the
    engine's database."""
    with serving(engine_database, tmp_path_factory.mktemp("own")) as (_, server):
        backend = LocalBackend(server.handlers, server.workers)
        with (
            running_shim(Config(grpc_addr="127.0.0.1:0"), backend) as http,
            httpx.Client(base_url=http.url, timeout=30) as client,
        ):
            yield client, engine_database


@contextmanager
def serving(
    engine: EngineDatabase, directory: Path
) -> Iterator[tuple[pb_grpc.TaskNodeServiceStub, Server]]:
    """A server reading engine's database, its own database (in directory) holding ALL_APP
    and the plugins' output schemas; a stub calling as ALL_APP."""
    own = f"sqlite:///{directory / 'tasknode.db'}"
    make_own_database(own, engine, [], [])
    config = Config(database_url=own, bksops_database_url=engine.url, grpc_addr="127.0.0.1:0")
    with started(config, ALL_APP) as (stub, server):
        yield stub, server


@contextmanager
def started(
    config: Config, credentials: dict[str, str]
) -> Iterator[tuple[pb_grpc.TaskNodeServiceStub, Server]]:
    """A started server of config, and a stub calling it with credentials; stopped after."""
    server: Server = create_server(config)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.TaskNodeServiceStub(authorized(channel, credentials)), server
    finally:
        server.stop(None)


def make_own_database(
    url: str, engine: EngineDatabase, projects: list[dict[str, Any]], tasks: list[dict[str, Any]]
) -> None:
    """A new own database at url holding ALL_APP, the plugins' output schemas, and the
    projects and tasks given."""
    db = open_database(url)
    with db.connection_context():
        ensure_schema(db)
        document = {
            "format": FORMAT,
            "projects": projects,
            "components": engine.manifest["components"],
            "tasks": tasks,
        }
        load_document(db, document)
        AppStore(db).add(
            ALL_APP["bk_app_code"],
            ALL_APP["bk_app_secret"],
            all_businesses=True,
            may_assert_user=True,
        )
    db.close()


def engine_two_tasks(engine: EngineDatabase) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """(name, manifest entry, zlib web tree) of each task of engine v2 that is not deleted."""
    for name, entry in engine.manifest["pipelines"].items():
        if "task_id" not in entry or entry["deleted"] or entry["engine_ver"] != 2:
            continue
        (snapshot,) = engine_rows(
            engine,
            "SELECT s.data FROM pipeline_snapshot s JOIN pipeline_pipelineinstance i"
            " ON i.execution_snapshot_id = s.id WHERE i.id = ?",
            entry["instance_pk"],
        )
        yield name, entry, bytes(snapshot[0])


def node(engine: EngineDatabase, pipeline: str, label: str) -> tuple[dict[str, Any], str]:
    """The pipeline's manifest entry and the node's id."""
    entry = engine.manifest["pipelines"][pipeline]
    return entry, entry["nodes"][label]["id"]


def ask(
    served: tuple[pb_grpc.TaskNodeServiceStub, EngineDatabase],
    pipeline: str,
    label: str,
    stack: tuple[str, ...] = (),
    **fields: Any,
) -> pb.NodeDetail:
    stub, engine = served
    entry, node_id = node(engine, pipeline, label)
    request = pb.GetTaskNodeDetailRequest(
        bk_biz_id=str(entry["business_id"]),
        task_id=str(entry["task_id"]),
        node_id=node_id,
        subprocess_stack=[node(engine, pipeline, s)[1] for s in stack],
        **fields,
    )
    detail: pb.NodeDetail = stub.GetTaskNodeDetail(request, timeout=30)
    return detail


def engine_rows(engine: EngineDatabase, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Rows of the engine's tables, read with a connection of their own."""
    db = open_read_only(engine.url)
    sql = sql.replace("?", db.param)
    if isinstance(db, MySQLDatabase):
        sql = sql.replace('"loop"', "`loop`")
    try:
        db.connect()
        return list(db.execute_sql(sql, params).fetchall())
    finally:
        db.close()


def micros(moment: Any) -> int | None:
    from server.db.bksops import _micros

    return _micros(moment)


def state_row(engine: EngineDatabase, node_id: str) -> dict[str, Any]:
    (row,) = engine_rows(
        engine,
        "SELECT version, started_time, archived_time FROM eri_state WHERE node_id = ?",
        node_id,
    )
    return {"version": row[0], "start": micros(row[1]), "finish": micros(row[2])}


def history_ids(engine: EngineDatabase, node_id: str, loop: int) -> list[int]:
    rows = engine_rows(
        engine,
        'SELECT id FROM eri_executionhistory WHERE node_id = ? AND "loop" = ? ORDER BY id',
        node_id,
        loop,
    )
    return [int(r[0]) for r in rows]


def shown(detail: pb.NodeDetail) -> dict[str, Any]:
    """The fields of detail that bk-sops's answer carries, as bk-sops writes them
    (times as microseconds, histories and outputs as plain values)."""
    return {
        "state": pb.NodeState.Name(detail.state)[len("NODE_STATE_") :],
        "loop": detail.loop,
        "retry": detail.retry,
        "skip": detail.skip,
        "error_ignorable": detail.error_ignorable,
        "error_ignored": detail.error_ignored,
        "history_id": detail.history_id,
        "inputs": values.object_from_message(detail.inputs),
        "outputs": [output(o) for o in detail.outputs],
        "ex_data": detail.ex_data if detail.HasField("ex_data") else None,
        "histories": [history(h) for h in detail.histories],
    }


def output(o: pb.NodeOutput) -> dict[str, Any]:
    row = {"key": o.key, "value": values.from_message(o.value), "preset": o.preset}
    return {**row, "name": o.name} if o.name else row


def history(h: pb.NodeAttempt) -> dict[str, Any]:
    return {
        "id": h.history_id,
        "loop": h.loop,
        "retry": h.retry,
        "skip": h.skip,
        "state": pb.NodeState.Name(h.state)[len("NODE_STATE_") :],
        "inputs": values.object_from_message(h.inputs),
        "outputs": values.object_from_message(h.outputs),
        "ex_data": h.ex_data if h.HasField("ex_data") else None,
    }


def ran(**fields: Any) -> dict[str, Any]:
    """bk-sops's answer for a node that ran, with the defaults of the manifest's `expect`."""
    answer: dict[str, Any] = {
        "state": "FINISHED",
        "loop": 1,
        "retry": 0,
        "skip": False,
        "error_ignorable": False,
        "error_ignored": False,
        "history_id": -1,
        "inputs": {},
        "outputs": [],
        "ex_data": None,
        "histories": [],
    }
    answer.update(fields)
    return answer


def table(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """bk-sops's outputs without component_code: every raw key, unnamed, not preset."""
    return [{"key": k, "value": v, "preset": False} for k, v in raw.items()]


def same_times(detail: pb.NodeDetail, engine: EngineDatabase, node_id: str) -> None:
    """The node's version and times are the engine's own."""
    row = state_row(engine, node_id)
    assert detail.version == row["version"]
    start = detail.start_time.ToMicroseconds() if detail.HasField("start_time") else None
    finish = detail.finish_time.ToMicroseconds() if detail.HasField("finish_time") else None
    assert (start, finish) == (row["start"], row["finish"])


def test_a_succeeded_service_answers_its_raw_inputs_and_outputs(served: Any) -> None:
    detail = ask(served, "nested", "taken")
    loops = {"_loop": 1, "_inner_loop": 1}
    assert shown(detail) == ran(
        inputs={**loops, "word": "taken"},
        outputs=table({"word": "taken", "greeting": "你好, 世界", "_result": True, **loops}),
    )
    assert detail.executed and detail.name == "taken"
    same_times(detail, served[1], node(served[1], "nested", "taken")[1])


def test_an_output_a_root_constant_takes_is_shown_under_the_constants_key(
    served: Any,
) -> None:
    loops = {"_loop": 1, "_inner_loop": 1}
    detail = ask(served, "services", "ok")
    assert shown(detail) == ran(
        inputs={**loops, "word": "hello", "unicode": "中文 \U0001f600"},
        outputs=table(
            {
                "word": "hello",
                "unicode": "中文 \U0001f600",
                "greeting_text": "你好, 世界",
                "_result": True,
                **loops,
            }
        ),
    )
    named = ask(served, "services", "ok", component_code="harness_echo")
    assert output(named.outputs[0]) == {
        "key": "greeting_text",
        "name": "Greeting",
        "value": "你好, 世界",
        "preset": True,
    }


def test_component_code_orders_declared_outputs_then_the_framework_keys(served: Any) -> None:
    detail = ask(served, "nested", "taken", component_code="harness_echo")
    assert shown(detail)["outputs"] == [
        {"key": "greeting", "name": "Greeting", "value": "你好, 世界", "preset": True},
        {"key": "word", "name": "word", "value": "taken", "preset": False},
        {"key": "_result", "name": "_result", "value": True, "preset": False},
        {"key": "_loop", "name": "_loop", "value": 1, "preset": False},
        {"key": "_inner_loop", "name": "_inner_loop", "value": 1, "preset": False},
    ]


def test_a_failed_node_in_a_sub_process_shows_its_ex_data(served: Any) -> None:
    detail = ask(served, "stuck", "fails", stack=("sub",))
    outputs = {"ex_data": GATE_CLOSED, "_result": False, "_loop": 1, "_inner_loop": 1}
    assert shown(detail) == ran(
        state="FAILED",
        inputs={"_loop": 1, "_inner_loop": 1, "ok": False},
        outputs=table(outputs),
        ex_data=GATE_CLOSED,
    )
    assert list(detail.subprocess_stack) == [node(served[1], "stuck", "sub")[1]]
    same_times(detail, served[1], node(served[1], "stuck", "fails")[1])


def test_a_retried_node_shows_its_failed_attempt_under_the_engines_history_id(
    served: Any,
) -> None:
    engine = served[1]
    _, node_id = node(engine, "services", "retried")
    (history_id,) = history_ids(engine, node_id, 1)
    loops = {"_loop": 1, "_inner_loop": 1}
    detail = ask(served, "services", "retried")
    assert shown(detail) == ran(
        retry=1,
        inputs={"ok": True, **loops},
        outputs=table({"passed": True, "_result": True, **loops}),
        histories=[
            {
                "id": history_id,
                "loop": 1,
                "retry": 0,
                "skip": False,
                "state": "FAILED",
                "inputs": {**loops, "ok": False},
                "outputs": {"ex_data": GATE_CLOSED, "_result": False, **loops},
                "ex_data": GATE_CLOSED,
            }
        ],
    )
    same_times(detail, engine, node_id)


def test_a_skipped_node_is_finished_with_skip_and_its_failed_attempt(served: Any) -> None:
    engine = served[1]
    _, node_id = node(engine, "services", "skipped")
    (history_id,) = history_ids(engine, node_id, 1)
    loops = {"_loop": 1, "_inner_loop": 1}
    failed = {"ex_data": GATE_CLOSED, "_result": False, **loops}
    assert shown(ask(served, "services", "skipped")) == ran(
        skip=True,
        inputs={**loops, "ok": False},
        outputs=table(failed),
        ex_data=GATE_CLOSED,
        histories=[
            {
                "id": history_id,
                "loop": 1,
                "retry": 0,
                "skip": False,
                "state": "FAILED",
                "inputs": {**loops, "ok": False},
                "outputs": failed,
                "ex_data": GATE_CLOSED,
            }
        ],
    )


def test_an_ignored_error_shows_the_runtime_flag_in_both_fields(served: Any) -> None:
    loops = {"_loop": 1, "_inner_loop": 1}
    assert shown(ask(served, "services", "ignored")) == ran(
        error_ignorable=True,
        error_ignored=True,
        inputs={**loops, "ok": False},
        outputs=table({"ex_data": GATE_CLOSED, "_result": False, **loops}),
        ex_data=GATE_CLOSED,
    )


def test_a_looped_node_shows_its_current_loop_and_older_loops_by_their_last_record(
    served: Any,
) -> None:
    engine = served[1]
    _, body = node(engine, "loop", "body")
    current = shown(ask(served, "loop", "body"))
    loops3 = {"_loop": 3, "_inner_loop": 3}
    assert current == ran(
        loop=3,
        inputs={**loops3, "word": "again"},
        # ${count} is a root constant fed by body's _loop: bk-sops shows it as count.
        outputs=table(
            {
                "word": "again",
                "greeting": "你好, 世界",
                "_result": True,
                "count": 3,
                "_inner_loop": 3,
            }
        ),
    )
    (first,) = history_ids(engine, body, 1)
    older = ask(served, "loop", "body", loop=1)
    loops1 = {"_loop": 1, "_inner_loop": 1}
    assert shown(older) == ran(
        loop=1,
        history_id=first,
        inputs={**loops1, "word": "again"},
        outputs=table(
            {
                "word": "again",
                "greeting": "你好, 世界",
                "_result": True,
                "count": 1,
                "_inner_loop": 1,
            }
        ),
    )


def test_a_node_retried_inside_a_loop_shows_that_loops_attempts(served: Any) -> None:
    engine = served[1]
    _, flaky = node(engine, "loop", "flaky")
    failed, final = history_ids(engine, flaky, 1)
    detail = shown(ask(served, "loop", "flaky", loop=1))
    # The loop's last record is its final run; the earlier ones its histories. retry is the
    # current state's (0: the node's last pass was not retried).
    assert (detail["state"], detail["loop"], detail["retry"], detail["history_id"]) == (
        "FINISHED",
        1,
        0,
        final,
    )
    assert detail["inputs"] == {"ok": True, "_loop": 1, "_inner_loop": 1}
    assert [(h["id"], h["retry"], h["state"], h["inputs"]["ok"]) for h in detail["histories"]] == [
        (failed, 0, "FAILED", False)
    ]
    assert shown(ask(served, "loop", "flaky"))["loop"] == 3


def test_a_gateway_on_the_loop_path_has_no_data(served: Any) -> None:
    assert shown(ask(served, "loop", "decide")) == ran(loop=3, ex_data="")


def test_a_sub_process_lists_its_children_in_engine_order(served: Any) -> None:
    engine = served[1]
    _, outer = node(engine, "nested", "outer")
    detail = ask(served, "nested", "outer")
    assert shown(detail) == ran(
        inputs={"word": "from the root"},
        outputs=table({"_loop": 1, "_inner_loop": 1}),
    )
    children = engine_rows(
        engine, "SELECT node_id, name FROM eri_state WHERE parent_id = ? ORDER BY id", outer
    )
    named = {node(engine, "nested", label)[1]: label for label in ("shallow", "inner")}
    assert [(c.id, pb.NodeState.Name(c.state)) for c in detail.children] == [
        (child, "NODE_STATE_" + state) for child, state in children
    ]
    assert [c.name for c in detail.children if c.id in named] == ["shallow", "inner"]
    inner = ask(served, "nested", "inner", stack=("outer",))
    assert len(inner.children) == 3
    deep = ask(served, "nested", "deep", stack=("outer", "inner"))
    assert values.object_from_message(deep.inputs)["word"] == "level 2"


def test_a_sub_process_whose_child_failed_is_running(served: Any) -> None:
    detail = ask(served, "stuck", "sub")
    assert shown(detail) == ran(state="RUNNING")
    assert not detail.HasField("finish_time")
    assert [pb.NodeState.Name(c.state) for c in detail.children] == [
        "NODE_STATE_FINISHED",
        "NODE_STATE_FAILED",
    ]


def test_a_running_node_has_no_finish_time(served: Any) -> None:
    detail = ask(served, "stuck", "wait")
    loops = {"_loop": 1, "_inner_loop": 1}
    assert shown(detail) == ran(
        state="RUNNING", inputs=loops, outputs=table({"_result": True, **loops})
    )
    same_times(detail, served[1], node(served[1], "stuck", "wait")[1])


def test_a_node_paused_before_running_is_suspended_without_data(served: Any) -> None:
    detail = ask(served, "paused", "held")
    assert shown(detail) == ran(state="SUSPENDED", ex_data="")
    assert not detail.HasField("start_time")


@pytest.mark.parametrize(
    ("pipeline", "label", "stack", "name", "inputs"),
    [
        ("nested", "not_run", (), "not run", {"word": "never"}),
        ("stuck", "after", (), "after", {"word": "later"}),
        ("unstarted", "act", (), "unstarted", {"word": "unstarted"}),
        ("stuck", "end", (), "", {}),
        # bamboo_engine.api.preview_node_inputs: a sub-process's params, rendered in its
        # parent's context, override its own defaults ("sub default") for its children.
        ("stuck", "later_child", ("later",), "later child", {"word": "set by parent"}),
    ],
)
def test_a_node_not_run_is_ready_with_its_configured_inputs(
    served: Any,
    pipeline: str,
    label: str,
    stack: tuple[str, ...],
    name: str,
    inputs: dict[str, Any],
) -> None:
    detail = ask(served, pipeline, label, stack)
    assert (detail.executed, pb.NodeState.Name(detail.state), detail.name) == (
        False,
        "NODE_STATE_READY",
        name,
    )
    assert values.object_from_message(detail.inputs) == inputs
    assert (list(detail.outputs), detail.ex_data, detail.error_ignorable) == ([], "", False)


def test_pickled_values_are_read_with_the_allow_list_and_sent_as_django_writes_them(
    served: Any,
) -> None:
    loops = {"_loop": 1, "_inner_loop": 1}
    pickled = {
        "when": "2024-05-17T08:30:15Z",
        "day": "2024-05-17",
        "amount": "12.50",
        "ident": "12345678-1234-5678-1234-567812345678",
    }
    assert shown(ask(served, "services", "pickled"))["outputs"] == table(
        {**pickled, "_result": True, **loops}
    )
    stamped = shown(ask(served, "services", "stamped"))
    assert stamped["inputs"] == {"at": pickled["when"], **loops}
    repickled = shown(ask(served, "services", "repickled"))
    (attempt,) = repickled["histories"]
    assert (attempt["outputs"]["when"], attempt["ex_data"]) == (
        pickled["when"],
        "failed after pickling",
    )


def test_nan_infinity_and_big_integers_are_served_as_the_engine_stored_them(
    served: Any,
) -> None:
    """services.odd: NaN, Infinity and 2**70, which the engine's JSON column holds as
    Python's json writes them; the reply carries them as doubles and digits."""
    detail = ask(served, "services", "odd")
    outputs = {o.key: o.value for o in detail.outputs}
    assert math.isnan(outputs["nan"].double_value)
    assert outputs["inf"].double_value == math.inf
    assert outputs["huge"].big_int_value == str(2**70)
    assert values.from_message(outputs["huge"]) == 2**70
    assert values.from_message(outputs["text"]) == "emoji \U0001f600 and 中文"
    assert values.from_message(outputs["big"]) == "x" * 200_000


def test_nodes_without_execution_data_answer_no_table_with_component_code(
    served: Any,
) -> None:
    """bk-sops answers an event or gateway (run or not) before it formats outputs."""
    gateway = ask(served, "loop", "decide", component_code="harness_echo")
    assert (gateway.executed, list(gateway.outputs), gateway.ex_data) == (True, [], "")
    end = ask(served, "stuck", "end", component_code="harness_echo")
    assert (end.executed, list(end.outputs), end.ex_data) == (False, [], "")
    # The engine's tree gives the events no name: bk-sops sends null.
    assert (end.name, end.name_null) == ("", True)


def test_a_batch_reads_each_item_from_the_engine(served: Any) -> None:
    stub, engine = served
    requests = []
    for pipeline, label in (("services", "retried"), ("deleted", "act"), ("nested", "taken")):
        entry, node_id = node(engine, pipeline, label)
        requests.append(
            pb.GetTaskNodeDetailRequest(
                bk_biz_id=str(entry["business_id"]), task_id=str(entry["task_id"]), node_id=node_id
            )
        )
    reply = stub.BatchGetTaskNodeDetails(
        pb.BatchGetTaskNodeDetailsRequest(requests=requests), timeout=30
    )
    kinds = [r.WhichOneof("result") for r in reply.results]
    assert kinds == ["detail", "error", "detail"]
    assert reply.results[0].detail.retry == 1 and len(reply.results[0].detail.histories) == 1
    assert reply.results[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert reply.results[2].detail == ask(served, "nested", "taken")


@pytest.mark.parametrize(
    ("pipeline", "code", "reason"),
    [
        ("deleted", grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND"),
        ("legacy_engine", grpc.StatusCode.FAILED_PRECONDITION, "UNSUPPORTED_ENGINE"),
    ],
)
def test_deleted_and_legacy_engine_tasks_are_refused(
    served: Any, pipeline: str, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        ask(served, pipeline, "act")
    found, why, message = failure(caught.value)
    assert (found, why) == (code, reason)
    assert f"task {served[1].manifest['pipelines'][pipeline]['task_id']} " in message


def failure(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, str]:
    """(code, ErrorInfo reason, message) of a failed call."""
    status = rpc_status.from_call(error)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    return error.code(), info.reason, status.message


def test_businesses_map_to_projects_as_bk_sops_maps_them(served: Any) -> None:
    stub, engine = served
    entry, node_id = node(engine, "other_business", "act")
    by_business = pb.GetTaskNodeDetailRequest(
        bk_biz_id=str(engine.manifest["other_business_id"]),
        task_id=str(entry["task_id"]),
        node_id=node_id,
    )
    assert stub.GetTaskNodeDetail(by_business, timeout=30).state == pb.NODE_STATE_FINISHED
    by_project = pb.GetTaskNodeDetailRequest(
        bk_biz_id=str(entry["project_id"]),
        task_id=str(entry["task_id"]),
        node_id=node_id,
        scope=pb.SCOPE_PROJECT,
    )
    assert stub.GetTaskNodeDetail(by_project, timeout=30).state == pb.NODE_STATE_FINISHED
    wrong = pb.GetTaskNodeDetailRequest(
        bk_biz_id=str(engine.manifest["business_id"]),
        task_id=str(entry["task_id"]),
        node_id=node_id,
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTaskNodeDetail(wrong, timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_read_mask_reads_the_engine_too(served: Any) -> None:
    full = ask(served, "nested", "taken")
    masked = ask(served, "nested", "taken", read_mask=FieldMask(paths=["state", "outputs"]))
    assert masked.state == full.state and list(masked.outputs) == list(full.outputs)
    assert not masked.inputs.fields and masked.etag and masked.etag != full.etag


def test_each_engine_query_is_a_span_named_by_what_it_reads(served: Any) -> None:
    exporter = InMemorySpanExporter()
    traces.configure(Config(), exporter)
    # A mask no other test asks: its reply is not in the cache, so it is built here.
    mask = FieldMask(paths=["state", "inputs", "outputs", "retry"])
    try:
        ask(served, "services", "ok", read_mask=mask)
    finally:
        traces.shutdown()
    found = exporter.get_finished_spans()
    (call,) = [s for s in found if s.name.endswith("/GetTaskNodeDetail")]
    assert call.context is not None
    queries = {s.name for s in found if s.parent and s.parent.span_id == call.context.span_id}
    # The task's tree may be cached from an earlier test: it is read once per snapshot.
    assert {"store stamp", "store task", "store state", "store data"} <= queries
    # The business and its task are one statement; a node that ran is not previewed.
    assert not {"store other", "store business", "store context"} & queries


def test_listing_a_tasks_nodes_is_refused_clearly(served: Any) -> None:
    """The listing reads our own node table; on an engine database it says so instead of
    running that SQL there."""
    stub, engine = served
    entry, _ = node(engine, "nested", "taken")
    request = pb.ListTaskNodesRequest(
        bk_biz_id=str(entry["business_id"]), task_id=str(entry["task_id"])
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListTaskNodes(request, timeout=30)
    code, reason, message = failure(caught.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "UNSUPPORTED_BY_STORE")
    assert "ListTaskNodes" in message


def test_a_malicious_pickle_in_the_engine_database_runs_nothing_and_names_the_node(
    engine_venv: Path, tmp_path: Path
) -> None:
    """A row rewritten to a pickle whose load would create a file: the call fails naming
    the node, and the file never appears. (SQLite only: the test writes the engine's file.)"""
    url = f"sqlite:///{tmp_path / 'engine.db'}"
    engine = EngineDatabase("sqlite", url, run_pipelines(url, tmp_path))
    target = tmp_path / "pwned"

    class Touch:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(target), "w"))

    _, node_id = node(engine, "nested", "taken")
    evil = base64.b64encode(pickle.dumps({"word": Touch()}, protocol=4)).decode()
    with sqlite3.connect(tmp_path / "engine.db") as conn:
        conn.execute(
            "UPDATE eri_executiondata SET outputs_serializer = 'pickle', outputs = ?"
            " WHERE node_id = ?",
            (evil, node_id),
        )
    conn.close()
    own = tmp_path / "own"
    own.mkdir()
    with serving(engine, own) as (stub, _), pytest.raises(grpc.RpcError) as caught:
        ask((stub, engine), "nested", "taken")
    code, reason, message = failure(caught.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "UNREADABLE_DATA")
    assert node_id in message and "may not load io.open" in message
    assert not target.exists()


def walk(tree: list[Any], stack: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...]]]:
    for node_id, inner in tree:
        yield node_id, stack
        yield from walk(inner, (*stack, node_id))


# The legacy route last: its server binds the models' database, which `served` shares.


def shanghai(micros: int | None) -> str | None:
    """A stored time as bk-sops prints it."""
    if micros is None:
        return None
    moment = datetime.datetime.fromtimestamp(micros / 1e6, ZoneInfo("Asia/Shanghai"))
    return moment.strftime("%Y-%m-%d %H:%M:%S %z")


def test_the_legacy_route_answers_a_retried_node_as_bk_sops_does(legacy: Any) -> None:
    """Field for field and type for type, with the engine v2 keys (`root_id:`, `parent_id`,
    each history's `id`), but for the legacy engine's `name`, which we add."""
    client, engine = legacy
    entry, node_id = node(engine, "services", "retried")
    (history_id,) = history_ids(engine, node_id, 1)
    row = state_row(engine, node_id)
    (old,) = engine_rows(
        engine,
        "SELECT version, started_time, archived_time FROM eri_executionhistory WHERE id = ?",
        history_id,
    )
    loops = {"_loop": 1, "_inner_loop": 1}
    old_start, old_finish = micros(old[1]), micros(old[2])
    assert row["start"] is not None and row["finish"] is not None
    assert old_start is not None and old_finish is not None
    bk_sops = {
        "id": node_id,
        "state": "FINISHED",
        "root_id:": entry["pipeline_id"],
        "parent_id": entry["pipeline_id"],
        "version": row["version"],
        "loop": 1,
        "retry": 1,
        "skip": False,
        "error_ignorable": False,
        "error_ignored": False,
        "children": {},
        "elapsed_time": round((row["finish"] - row["start"]) / 1e6),
        "start_time": shanghai(row["start"]),
        "finish_time": shanghai(row["finish"]),
        "histories": [
            {
                "id": history_id,
                "history_id": history_id,
                "node_id": node_id,
                "loop": 1,
                "retry": 0,
                "skip": False,
                "version": old[0],
                "inputs": {**loops, "ok": False},
                "outputs": {"ex_data": GATE_CLOSED, "_result": False, **loops},
                "ex_data": GATE_CLOSED,
                "state": "FAILED",
                "children": {},
                "start_time": shanghai(old_start),
                "finish_time": shanghai(old_finish),
                "elapsed_time": round((old_finish - old_start) / 1e6),
            }
        ],
        "history_id": -1,
        "inputs": {"ok": True, **loops},
        "outputs": table({"passed": True, "_result": True, **loops}),
        "ex_data": None,
    }
    response = client.get(
        "/api/c/compapi/v2/sops/get_task_node_detail/",
        params={**ALL_APP, "bk_biz_id": "2", "task_id": entry["task_id"], "node_id": node_id},
    )
    body = response.json()
    assert (response.status_code, body["result"], body["code"]) == (200, True, 0)
    data = body["data"]
    assert data.pop("name") == "retried"
    assert data == bk_sops


def test_the_legacy_route_writes_them_as_bk_sops_does(legacy: Any) -> None:
    """bk-sops's JsonResponse writes them with Python's json: NaN, Infinity, the digits."""
    client, engine = legacy
    entry, node_id = node(engine, "services", "odd")
    response = client.get(
        "/api/c/compapi/v2/sops/get_task_node_detail/",
        params={**ALL_APP, "bk_biz_id": "2", "task_id": entry["task_id"], "node_id": node_id},
    )
    assert response.status_code == 200
    for written in (
        '{"key":"nan","value":NaN,',
        '{"key":"inf","value":Infinity,',
        '{"key":"huge","value":1180591620717411303424,',
    ):
        assert written in response.text
    data = response.json()["data"]
    assert data["outputs"][2] == {"key": "huge", "value": 2**70, "preset": False}


def test_the_legacy_data_of_every_node_is_what_bk_sops_computes(legacy: Any) -> None:
    """Every node that ran (and every event and gateway that has not) of every engine-2
    task, each older loop, with and without component_code: the legacy `data` equals what
    bk-sops's rules make of the engine's rows (tests/engine/reference.py), field for field
    and type for type, but for the `name` we add to a node that ran and to its children."""
    client, engine = legacy
    schemas = {(c["code"], c["version"]): c["outputs"] for c in engine.manifest["components"]}

    def rows(sql: str, *params: object) -> list[tuple[Any, ...]]:
        return engine_rows(engine, sql, *params)

    seen = set()
    for _, entry, snapshot in engine_two_tasks(engine):
        tree = reference.web_tree(snapshot)
        for node_id, stack in walk(tree_of(snapshot), ()):
            info = reference._node_info(tree, stack, node_id)
            ran = bool(rows("SELECT id FROM eri_state WHERE node_id = ?", node_id))
            if not ran and info["type"] in ("ServiceActivity", "SubProcess"):
                continue  # the preview: checked against bk-sops above
            state = rows('SELECT "loop" FROM eri_state WHERE node_id = ?', node_id)
            loops: list[int | None] = [None, *range(1, state[0][0] if state else 1)]
            code = (info.get("component") or {}).get("code", "")
            for loop in loops:
                for component_code in {"", code}:
                    params = {
                        **ALL_APP,
                        "bk_biz_id": str(entry["business_id"]),
                        "task_id": entry["task_id"],
                        "node_id": node_id,
                        "subprocess_stack": json.dumps(list(stack)),
                        **({"loop": str(loop)} if loop else {}),
                        **({"component_code": component_code} if component_code else {}),
                    }
                    response = client.get(
                        "/api/c/compapi/v2/sops/get_task_node_detail/", params=params
                    )
                    ours = response.json()["data"]
                    expected = reference.bk_sops_data(
                        rows, tree, node_id, stack, schemas, loop, component_code
                    )
                    if ran:
                        ours.pop("name")
                        for child in ours["children"].values():
                            child.pop("name")
                    for answer in (
                        ours,
                        expected,
                        *ours.get("children", {}).values(),
                        *expected.get("children", {}).values(),
                    ):
                        if answer.get("finish_time", "") is None:
                            answer.pop("elapsed_time")  # grows with the clock
                    assert typed(ours) == typed(expected), (entry["task_id"], node_id, params)
                    seen.add((info["type"], ran, bool(component_code), bool(loop)))
    assert len(seen) >= 8, seen


def typed(value: Any) -> Any:
    """value with each leaf paired with its type, so 1 != 1.0 != True; NaN equal to NaN."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return ("nan", float)
    return (value, type(value))

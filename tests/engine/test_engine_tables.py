"""The harness's own truth: what the real engine wrote is what its manifest says it ran.

These read the engine's database with the service's own drivers (peewee over sqlite3, psycopg2
and pymysql), on each store, so the bk-sops store built on them starts from checked facts.
"""

from __future__ import annotations

import base64
import json
import pickletools
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from peewee import Database
from peewee import MySQLDatabase

from tests.engine.conftest import EngineDatabase
from tests.engine.harness import open_reader


@pytest.fixture
def db(engine_database: EngineDatabase) -> Iterator[Database]:
    database = open_reader(engine_database.url)
    with database.connection_context():
        yield database


def rows(db: Database, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """sql with ? placeholders and "quoted" names, run in the database's own dialect.

    `loop` (a column of eri_state and eri_executionhistory) is a reserved word in MariaDB.
    """
    if isinstance(db, MySQLDatabase):
        sql = sql.replace('"', "`")
    return list(db.execute_sql(sql.replace("?", db.param), params).fetchall())


def nodes(engine_database: EngineDatabase) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(pipeline id, label, node) for every node the manifest lists."""
    for pipeline in engine_database.manifest["pipelines"].values():
        for label, node in pipeline["nodes"].items():
            yield pipeline["pipeline_id"], label, node


def test_states_are_what_the_engine_was_made_to_do(
    engine_database: EngineDatabase, db: Database
) -> None:
    checked = 0
    for pipeline_id, label, node in nodes(engine_database):
        expect = node["expect"]
        found = rows(
            db,
            'SELECT name, "loop", retry, skip, error_ignored, parent_id, root_id, version,'
            " started_time FROM eri_state WHERE node_id = ?",
            node["id"],
        )
        if expect["state"] is None:
            assert found == [], f"{label} ({node['kind']}) should not have run"
            continue
        assert len(found) == 1, label
        name, loop, retry, skip, error_ignored, parent_id, root_id, version, started = found[0]
        assert name == expect["state"], label
        assert (loop, retry) == (expect.get("loop", 1), expect.get("retry", 0)), label
        assert bool(skip) is expect.get("skip", False), label
        assert bool(error_ignored) is expect.get("error_ignored", False), label
        assert parent_id == expect.get("parent", pipeline_id), label
        assert root_id == pipeline_id, label
        assert version.startswith("v") and len(version) == 33, label
        assert (started is not None) is expect.get("started", True), label
        checked += 1
    assert checked >= 20


def test_subprocess_children_are_the_states_it_parents(
    engine_database: EngineDatabase, db: Database
) -> None:
    subprocesses = [n for _, _, n in nodes(engine_database) if "children" in n["expect"]]
    assert len(subprocesses) == 3
    for node in subprocesses:
        children = rows(db, "SELECT node_id FROM eri_state WHERE parent_id = ?", node["id"])
        assert len(children) == node["expect"]["children"], node["kind"]


def test_finished_pipelines_have_finished_root_states(
    engine_database: EngineDatabase, db: Database
) -> None:
    for name, pipeline in engine_database.manifest["pipelines"].items():
        state = rows(db, "SELECT name FROM eri_state WHERE node_id = ?", pipeline["pipeline_id"])
        ((started, finished),) = rows(
            db,
            "SELECT is_started, is_finished FROM pipeline_pipelineinstance WHERE instance_id = ?",
            pipeline["pipeline_id"],
        )
        assert bool(started) is pipeline["started"], name
        if not pipeline["started"]:
            assert state == [], name
        else:
            root = pipeline.get("root_state", "FINISHED" if pipeline["finished"] else "RUNNING")
            assert state == [(root,)], name
        assert bool(finished) is pipeline["finished"], name
    assert not engine_database.manifest["pipelines"]["stuck"]["finished"]
    assert engine_database.manifest["pipelines"]["called_back"]["finished"]


#: What a pickled FancyDict holding an aware UTC datetime names (timezone.utc pickles as
#: timezone(timedelta(0))).
PICKLED_DATETIME = {
    "pipeline.utils.collections.FancyDict",
    "datetime.datetime",
    "datetime.timezone",
    "datetime.timedelta",
}


def pickle_globals(encoded: str) -> set[str]:
    """The classes a base64 pickle names, read from its opcodes without unpickling it."""
    pushed: list[str | None] = []  # what each opcode put on the stack, when it was a string
    memo: dict[int, str | None] = {}
    names = set()
    for opcode, argument, _ in pickletools.genops(base64.b64decode(encoded)):
        if opcode.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        elif opcode.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo[int(argument)])  # type: ignore[arg-type]
        elif opcode.name == "STACK_GLOBAL":
            names.add(f"{pushed[-2]}.{pushed[-1]}")
            pushed.append(None)
        elif opcode.name == "GLOBAL":
            names.add(str(argument).replace(" ", "."))
            pushed.append(None)
        else:
            pushed.append(argument if isinstance(argument, str) else None)
    return names


def test_execution_data_as_the_engine_serialised_it(
    engine_database: EngineDatabase, db: Database
) -> None:
    for _, label, node in nodes(engine_database):
        expect = node["expect"]
        found = rows(
            db,
            "SELECT inputs_serializer, outputs_serializer, inputs, outputs"
            " FROM eri_executiondata WHERE node_id = ?",
            node["id"],
        )
        if expect["state"] is None or expect.get("data", True) is False:
            assert found == [], f"{label} ({node['kind']}) has no execution data"
            continue
        ((inputs_serializer, outputs_serializer, inputs, outputs),) = found
        assert inputs_serializer == expect.get("inputs_serializer", "json"), label
        assert outputs_serializer == expect.get("outputs_serializer", "json"), label
        if inputs_serializer == "pickle":
            assert pickle_globals(inputs) == PICKLED_DATETIME, label
            inputs = "{}"
        if outputs_serializer == "pickle":
            assert pickle_globals(outputs) >= PICKLED_DATETIME, label
            continue
        inputs, outputs = json.loads(inputs), json.loads(outputs)
        assert expect.get("inputs", {}).items() <= inputs.items(), label
        assert expect.get("outputs", {}).items() <= outputs.items(), label
        if "ex_data" in expect:
            assert outputs["ex_data"] == expect["ex_data"], label
            assert outputs["_result"] is False, label
        elif "_result" in outputs:
            assert "ex_data" not in outputs, label


def test_datetime_decimal_and_uuid_outputs_are_pickled(
    engine_database: EngineDatabase, db: Database
) -> None:
    pickled = engine_database.manifest["pipelines"]["services"]["nodes"]["pickled"]["id"]
    ((outputs,),) = rows(db, "SELECT outputs FROM eri_executiondata WHERE node_id = ?", pickled)
    assert pickle_globals(outputs) == PICKLED_DATETIME | {
        "datetime.date",
        "decimal.Decimal",
        "uuid.UUID",
    }


def test_unusual_values_stay_json(engine_database: EngineDatabase, db: Database) -> None:
    odd = engine_database.manifest["pipelines"]["services"]["nodes"]["odd"]["id"]
    ((text,),) = rows(db, "SELECT outputs FROM eri_executiondata WHERE node_id = ?", odd)
    outputs = json.loads(text)
    assert outputs["nan"] != outputs["nan"]
    assert outputs["inf"] == float("inf")
    assert outputs["huge"] == 2**70
    assert outputs["text"] == "emoji \U0001f600 and 中文"
    assert len(outputs["big"]) == 200_000
    assert "\\ud83d\\ude00" in text  # Python's json escapes it as a surrogate pair


def test_histories_of_retried_skipped_and_looped_nodes(
    engine_database: EngineDatabase, db: Database
) -> None:
    for _, label, node in nodes(engine_database):
        found = rows(
            db,
            'SELECT "loop", retry, skip, inputs, outputs, started_time, archived_time'
            " FROM eri_executionhistory WHERE node_id = ? ORDER BY id",
            node["id"],
        )
        assert len(found) == node["expect"].get("histories", 0), label
    services = engine_database.manifest["pipelines"]["services"]["nodes"]
    ((loop, retry, skip, inputs, outputs, started, archived),) = rows(
        db,
        'SELECT "loop", retry, skip, inputs, outputs, started_time, archived_time'
        " FROM eri_executionhistory WHERE node_id = ?",
        services["retried"]["id"],
    )
    assert (loop, retry, bool(skip)) == (1, 0, False)
    assert json.loads(inputs)["ok"] is False  # the failed attempt, before the new inputs
    assert json.loads(outputs)["ex_data"] == "gate closed: ok is false"
    assert started is not None and archived is not None
    ((skip_flag,),) = rows(
        db, "SELECT skip FROM eri_executionhistory WHERE node_id = ?", services["skipped"]["id"]
    )
    assert not skip_flag  # the row is the failed attempt, written before the skip
    for _, label, node in nodes(engine_database):
        serializers = rows(
            db,
            "SELECT inputs_serializer, outputs_serializer FROM eri_executionhistory"
            " WHERE node_id = ? ORDER BY id",
            node["id"],
        )
        expected = node["expect"].get("history_serializers")
        assert [list(row) for row in serializers] == (
            expected or [["json", "json"]] * len(serializers)
        ), label
        if "history_passes" in node["expect"]:
            passes = rows(
                db,
                'SELECT "loop", retry FROM eri_executionhistory WHERE node_id = ? ORDER BY id',
                node["id"],
            )
            assert [list(row) for row in passes] == node["expect"]["history_passes"], label


def tree_node_ids(tree: dict[str, Any], into: dict[str, str]) -> dict[str, str]:
    """node id -> id of the pipeline holding it, through nested sub-process pipelines."""
    pipeline_id = tree["id"]
    into[tree["start_event"]["id"]] = pipeline_id
    into[tree["end_event"]["id"]] = pipeline_id
    for gateway_id in tree["gateways"]:
        into[gateway_id] = pipeline_id
    for activity_id, activity in tree["activities"].items():
        into[activity_id] = pipeline_id
        if activity["type"] == "SubProcess":
            tree_node_ids(activity["pipeline"], into)
    return into


def test_tasks_link_projects_to_compressed_tree_snapshots(
    engine_database: EngineDatabase, db: Database
) -> None:
    manifest = engine_database.manifest
    businesses = set()
    for name, pipeline in manifest["pipelines"].items():
        ((bk_biz_id, from_cmdb, engine_ver, deleted, snapshot, tree_info),) = rows(
            db,
            "SELECT p.bk_biz_id, p.from_cmdb, t.engine_ver, t.is_deleted, s.data, i.data"
            " FROM taskflow3_taskflowinstance t"
            " JOIN core_project p ON p.id = t.project_id"
            " JOIN pipeline_pipelineinstance pi ON pi.id = t.pipeline_instance_id"
            " JOIN pipeline_snapshot s ON s.id = pi.execution_snapshot_id"
            " LEFT JOIN pipeline_treeinfo i ON i.id = pi.tree_info_id"
            " WHERE t.id = ? AND pi.instance_id = ?",
            pipeline["task_id"],
            pipeline["pipeline_id"],
        )
        businesses.add(bk_biz_id)
        assert (bk_biz_id, bool(from_cmdb)) == (pipeline["business_id"], True), name
        assert (engine_ver, bool(deleted)) == (pipeline["engine_ver"], pipeline["deleted"]), name
        tree = json.loads(zlib.decompress(bytes(snapshot)))
        assert tree["id"] == pipeline["pipeline_id"]
        held = tree_node_ids(tree, {})
        for label, node in pipeline["nodes"].items():
            expected_parent = node["expect"].get("parent", pipeline["pipeline_id"])
            assert held.get(node["id"]) == expected_parent, label
        if pipeline["started"]:
            node_id_set = json.loads(zlib.decompress(bytes(tree_info)))["node_id_set"]
            assert set(node_id_set) == set(held), name
        else:
            assert tree_info is None, name  # bk-sops computes it when the task starts
        assert tree["start_event"]["name"] is None  # events have no name in the tree
    assert businesses == {manifest["business_id"], manifest["other_business_id"]}


def test_snapshot_is_the_web_tree(engine_database: EngineDatabase, db: Database) -> None:
    """constants (not data), component.data of {hook, value} and a plugin version."""
    pipeline = engine_database.manifest["pipelines"]["loop"]
    ((snapshot,),) = rows(
        db,
        "SELECT s.data FROM pipeline_pipelineinstance pi"
        " JOIN pipeline_snapshot s ON s.id = pi.execution_snapshot_id WHERE pi.instance_id = ?",
        pipeline["pipeline_id"],
    )
    tree = json.loads(zlib.decompress(bytes(snapshot)))
    body = pipeline["nodes"]["body"]["id"]
    assert "data" not in tree
    count = tree["constants"]["${count}"]
    assert (count["source_type"], count["source_info"]) == ("component_outputs", {body: ["_loop"]})
    component = tree["activities"][body]["component"]
    assert component == {
        "code": "harness_echo",
        "data": {"word": {"hook": False, "value": "again"}},
        "version": "legacy",
    }


def test_context_values_of_node_outputs(engine_database: EngineDatabase, db: Database) -> None:
    """A constant fed by a node's output is a context row: JSON, or pickled like the output."""
    pipelines = engine_database.manifest["pipelines"]
    found = rows(
        db,
        'SELECT "key", type, serializer, value FROM eri_contextvalue WHERE pipeline_id = ?',
        pipelines["loop"]["pipeline_id"],
    )
    assert found == [("${count}", 1, "json", "3")]
    greeting, when = rows(
        db,
        'SELECT "key", serializer, value FROM eri_contextvalue WHERE pipeline_id = ?'
        ' ORDER BY "key"',
        pipelines["services"]["pipeline_id"],
    )
    assert greeting == ("${greeting_text}", "json", json.dumps("你好, 世界"))
    assert when[:2] == ("${when}", "pickle")
    assert pickle_globals(when[2]) == PICKLED_DATETIME - {"pipeline.utils.collections.FancyDict"}


def test_not_run_nodes_have_definitions_and_raw_inputs(
    engine_database: EngineDatabase, db: Database
) -> None:
    """The engine prepares every node when the pipeline starts: eri_node and eri_data rows exist
    for nodes that never ran; a sub-process not yet run has context rows of its own defaults."""
    stuck = engine_database.manifest["pipelines"]["stuck"]["nodes"]
    later, child = stuck["later"]["id"], stuck["later_child"]["id"]
    ((detail,),) = rows(db, "SELECT detail FROM eri_node WHERE node_id = ?", child)
    assert json.loads(detail)["parent_pipeline_id"] == later
    ((inputs,),) = rows(db, "SELECT inputs FROM eri_data WHERE node_id = ?", child)
    assert json.loads(inputs) == {"word": {"need_render": True, "value": "${word}"}}
    context = rows(db, 'SELECT "key", value FROM eri_contextvalue WHERE pipeline_id = ?', later)
    assert context == [("${word}", '"sub default"')]  # not the parent's "set by parent" yet


def test_subprocess_inputs_keep_their_constant_keys(
    engine_database: EngineDatabase, db: Database
) -> None:
    outer = engine_database.manifest["pipelines"]["nested"]["nodes"]["outer"]["id"]
    ((inputs,),) = rows(db, "SELECT inputs FROM eri_executiondata WHERE node_id = ?", outer)
    assert json.loads(inputs) == {"${word}": "from the root"}


def test_components_are_registered_with_their_schemas(
    engine_database: EngineDatabase, db: Database
) -> None:
    """The plugins' rows hold code and version only; their output schemas are in the manifest."""
    registered = rows(db, "SELECT code, version FROM component_framework_componentmodel")
    schemas = engine_database.manifest["components"]
    assert {(c["code"], c["version"]) for c in schemas} <= set(registered)
    echo = next(c for c in schemas if c["code"] == "harness_echo")
    assert echo == {
        "code": "harness_echo",
        "version": "legacy",
        "outputs": [{"key": "greeting", "name": "Greeting"}],
    }

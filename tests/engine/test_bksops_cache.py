"""The reply cache on a bk-sops database: a reply is reused only while nothing it shows changed.

bamboo-engine stamps none of its changes: it updates eri_state and eri_executiondata rows in
place (a node's version is refreshed only when it re-enters; a running node's data changes
while its state row does not), and inserts eri_executionhistory rows. Each test here makes a
server cache a reply (the second call is a hit), then changes the engine's rows the way the
engine's runtime does (pipeline.eri.imp: set_execution_data, set_state without a new version,
add_history, a child's set_state, a deleted task), and the next call must show the change.
The database is one the real engine ran its pipelines in, one per store, for this module.
"""

from __future__ import annotations

import copy
import datetime
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from urllib.parse import urlsplit

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from peewee import MySQLDatabase
from peewee import QueryEvent
from prometheus_client import REGISTRY

from server import values
from server.app import Server
from server.config import Config
from server.db.connection import open_database
from server.db.connection import open_read_only
from server.db.loader import FORMAT
from server.db.loader import load_document
from server.watch.service import serve_watch
from tests.conftest import ALL_APP
from tests.conftest import STORES
from tests.conftest import fresh_database
from tests.engine.conftest import EngineDatabase
from tests.engine.harness import run_pipelines
from tests.engine.test_bksops_store import engine_rows
from tests.engine.test_bksops_store import serving

Served = tuple[pb_grpc.TaskNodeServiceStub, Server, EngineDatabase]


@pytest.fixture(scope="module", params=STORES)
def writable(
    request: pytest.FixtureRequest, engine_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """A server with its reply cache on, over an engine database of this module's own (the
    tests change its rows)."""
    directory = tmp_path_factory.mktemp(f"cache-{request.param}")
    with fresh_database(request.param, directory) as url:
        engine = EngineDatabase(request.param, url, run_pipelines(url, directory))
        with serving(engine, directory) as (stub, server):
            assert server.cache is not None, "the reply cache is on for a bk-sops store"
            yield stub, server, engine


def write(engine: EngineDatabase, sql: str, *params: object) -> None:
    """Run one statement on the engine's database, committed, as the engine's process would."""
    if engine.store == "sqlite":
        path = unquote(urlsplit(engine.url).path[1:])
        conn = sqlite3.connect(path, isolation_level=None, timeout=10)
        try:
            conn.execute(sql, params)
        finally:
            conn.close()
        return
    db = open_read_only(engine.url)  # a plain pool on a server database: it writes too
    sql = sql.replace("?", db.param)
    if isinstance(db, MySQLDatabase):
        sql = sql.replace('"loop"', "`loop`")
    try:
        db.connect()
        with db.atomic():
            db.execute_sql(sql, params)
    finally:
        db.close_all()  # type: ignore[attr-defined]


def now(engine: EngineDatabase) -> object:
    """The current time as the engine's Django stores it (text on SQLite)."""
    moment = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    return str(moment) if engine.store == "sqlite" else moment


def hits() -> float:
    return REGISTRY.get_sample_value("tasknode_reply_cache_hits_total") or 0.0


def call(served: Served, pipeline: str, label: str) -> pb.NodeDetail:
    stub, _, engine = served
    entry = engine.manifest["pipelines"][pipeline]
    request = pb.GetTaskNodeDetailRequest(
        bk_biz_id=str(entry["business_id"]),
        task_id=str(entry["task_id"]),
        node_id=entry["nodes"][label]["id"],
    )
    detail: pb.NodeDetail = stub.GetTaskNodeDetail(request, timeout=30)
    return detail


def node_id(engine: EngineDatabase, pipeline: str, label: str) -> str:
    return str(engine.manifest["pipelines"][pipeline]["nodes"][label]["id"])


def cached_then_changed(
    served: Served, pipeline: str, label: str, change: Callable[[EngineDatabase], None]
) -> tuple[pb.NodeDetail, pb.NodeDetail]:
    """The node's reply once cached (the second call a hit, equal to the first), and the
    reply after change: built afresh (not a hit)."""
    engine = served[2]
    first = call(served, pipeline, label)
    before = hits()
    assert call(served, pipeline, label) == first
    assert hits() == before + 1, "the second call was not answered from the cache"
    change(engine)
    after = call(served, pipeline, label)
    assert hits() == before + 1, "a reply built before the change was served"
    return first, after


def test_changed_execution_data_with_the_state_row_untouched(writable: Served) -> None:
    """A running node's outputs change in place (set_execution_data), its state row not."""

    def change(engine: EngineDatabase) -> None:
        node = node_id(engine, "services", "ok")
        ((text,),) = engine_rows(
            engine, "SELECT outputs FROM eri_executiondata WHERE node_id = ?", node
        )
        outputs = {**json.loads(text), "word": "changed in place"}
        write(
            engine,
            "UPDATE eri_executiondata SET outputs = ? WHERE node_id = ?",
            json.dumps(outputs),
            node,
        )

    first, after = cached_then_changed(writable, "services", "ok", change)
    shown = {o.key: values.from_message(o.value) for o in after.outputs}
    assert shown["word"] == "changed in place"
    assert (after.state, after.version) == (first.state, first.version)


def test_a_state_changed_without_a_new_version(writable: Served) -> None:
    """A callback node finishing: set_state(FINISHED, version=its own, set_archive_time)."""

    def change(engine: EngineDatabase) -> None:
        write(
            engine,
            "UPDATE eri_state SET name = ?, archived_time = ? WHERE node_id = ?",
            "FINISHED",
            now(engine),
            node_id(engine, "stuck", "wait"),
        )

    first, after = cached_then_changed(writable, "stuck", "wait", change)
    assert first.state == pb.NODE_STATE_RUNNING and after.state == pb.NODE_STATE_FINISHED
    assert after.version == first.version and after.HasField("finish_time")


def test_a_history_row_inserted(writable: Served) -> None:
    """add_history: a row inserted, the node's own rows untouched."""

    def change(engine: EngineDatabase) -> None:
        node = node_id(engine, "services", "skipped")
        ((loop,),) = engine_rows(engine, 'SELECT "loop" FROM eri_state WHERE node_id = ?', node)
        write(
            engine,
            'INSERT INTO eri_executionhistory (node_id, "loop", retry, skip, version,'
            " started_time, archived_time, inputs_serializer, outputs_serializer, inputs,"
            " outputs) VALUES (?, ?, 7, ?, ?, ?, ?, 'json', 'json', '{}', ?)",
            node,
            loop,
            False,
            "v" + "7" * 32,
            now(engine),
            now(engine),
            json.dumps({"ex_data": "inserted", "_result": False, "_loop": loop}),
        )

    first, after = cached_then_changed(writable, "services", "skipped", change)
    assert len(after.histories) == len(first.histories) + 1
    assert after.histories[-1].version == "v" + "7" * 32


def test_a_child_of_a_sub_process_changed(writable: Served) -> None:
    """A sub-process's reply shows its children: a child's state row changes (retry_node's
    set_state to READY), the sub-process's own rows do not."""

    def change(engine: EngineDatabase) -> None:
        write(
            engine,
            "UPDATE eri_state SET name = ?, archived_time = NULL WHERE node_id = ?",
            "READY",
            node_id(engine, "stuck", "fails"),
        )

    first, after = cached_then_changed(writable, "stuck", "sub", change)
    child = node_id(writable[2], "stuck", "fails")
    states = {c.id: c.state for c in first.children}, {c.id: c.state for c in after.children}
    assert states[0][child] == pb.NODE_STATE_FAILED and states[1][child] == pb.NODE_STATE_READY


def test_a_deleted_task(writable: Served) -> None:
    """The task row changes (is_deleted): NOT_FOUND at once, not the cached reply."""
    engine = writable[2]
    call(writable, "other_business", "act")
    before = hits()
    call(writable, "other_business", "act")
    assert hits() == before + 1
    task = engine.manifest["pipelines"]["other_business"]["task_id"]
    write(engine, "UPDATE taskflow3_taskflowinstance SET is_deleted = ? WHERE id = ?", True, task)
    with pytest.raises(grpc.RpcError) as failure:
        call(writable, "other_business", "act")
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_hit_costs_one_statement_and_none_on_the_service_database(writable: Served) -> None:
    """A cached reply: one SELECT on the engine's database (no transaction), and nothing on
    the service's own (the catalog stamp is kept by a thread of its own: CatalogEpoch)."""
    _, server, _ = writable
    call(writable, "nested", "outer")  # built and cached
    call(writable, "nested", "outer")  # the catalog stamp read (kept by then anyway)
    engine_sql: list[str] = []
    own_sql: list[str] = []
    store: Any = server.store

    def engine_hook(event: QueryEvent) -> None:
        engine_sql.append(event.sql)

    def own_hook(event: QueryEvent) -> None:
        if threading.current_thread().name != "catalog-epoch":  # its reads serve all calls
            own_sql.append(event.sql)

    store.db.query_hooks.append(engine_hook)
    store.native.db.query_hooks.append(own_hook)
    try:
        before = hits()
        for _ in range(5):
            call(writable, "nested", "outer")
    finally:
        store.db.query_hooks.remove(engine_hook)
        store.native.db.query_hooks.remove(own_hook)
    assert hits() == before + 5
    assert len(engine_sql) == 5 and all(sql.startswith("SELECT") for sql in engine_sql), engine_sql
    assert own_sql == []


def _greeting_request(engine: EngineDatabase) -> pb.GetTaskNodeDetailRequest:
    """The services pipeline's ok node, with its harness_echo output names."""
    entry = engine.manifest["pipelines"]["services"]
    return pb.GetTaskNodeDetailRequest(
        bk_biz_id=str(entry["business_id"]),
        task_id=str(entry["task_id"]),
        node_id=entry["nodes"]["ok"]["id"],
        component_code="harness_echo",
    )


def _greeting(detail: pb.NodeDetail) -> str:
    return next(o.name for o in detail.outputs if o.key == "greeting_text")


def _load_greeting(server: Server, engine: EngineDatabase, name: str) -> float:
    """`server load` of harness_echo's schema with its greeting output named name, into
    the service's own database; when (time.monotonic()) it committed."""
    components = copy.deepcopy(engine.manifest["components"])
    for component in components:
        for output in component["outputs"]:
            if component["code"] == "harness_echo" and output["key"] == "greeting":
                output["name"] = name
    store: Any = server.store
    db = open_database(f"sqlite:///{store.native.db.database}")
    try:
        with db.connection_context():
            document = {"format": FORMAT, "projects": [], "components": components, "tasks": []}
            load_document(db, document)
    finally:
        db.close()
    return time.monotonic()


def test_a_schema_loaded_while_serving_shows_within_the_refresh_bound(writable: Served) -> None:
    """`server load` of a changed output schema while the server runs: cached replies that
    show it are served at most Config.bksops_catalog_refresh_seconds after the load."""
    stub, server, engine = writable
    store: Any = server.store
    bound = store.catalog.refresh
    assert bound == Config.bksops_catalog_refresh_seconds > 0
    request = _greeting_request(engine)

    def greeting() -> str:
        return _greeting(stub.GetTaskNodeDetail(request, timeout=30))

    before_name = greeting()
    before = hits()
    assert greeting() == before_name and hits() == before + 1  # cached
    loaded = _load_greeting(server, engine, f"{before_name}, reloaded")
    while greeting() != f"{before_name}, reloaded":
        assert time.monotonic() - loaded <= bound + 0.5, "the schema loaded was not shown"
        time.sleep(0.02)
    assert time.monotonic() - loaded <= bound + 0.5


def test_a_schema_loaded_while_watching_is_sent_to_the_node_streams(writable: Served) -> None:
    """A WatchTaskNode stream whose rendering names outputs by the schema is sent the
    reloaded names, though nothing of the engine's changed: the watch poll's stamp holds
    the catalog epoch too."""
    _, server, engine = writable
    store: Any = server.store
    interval = 0.05
    config = Config(grpc_addr="127.0.0.1:0", watch_addr="127.0.0.1:0", watch_interval=interval)
    watch = serve_watch(config, server)
    assert watch is not None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{watch.port}") as channel:
            stream = pb_grpc.TaskNodeServiceStub(channel).WatchTaskNode(
                pb.WatchTaskNodeRequest(node=_greeting_request(engine)),
                metadata=[("x-bkapi-authorization", json.dumps(ALL_APP))],
                timeout=30,
            )
            name = f"{_greeting(next(stream).detail)}, watched"
            loaded = _load_greeting(server, engine, name)
            for message in stream:
                if message.HasField("detail") and _greeting(message.detail) == name:
                    break
            took = time.monotonic() - loaded
            stream.cancel()
    finally:
        watch.stop(0)
    assert took <= store.catalog.refresh + interval + 1.0, took


def test_same_length_data_changed_in_place(writable: Served) -> None:
    """Outputs rewritten in place to text of the same length (a counter 7 -> 8): the digest,
    not the length, must tell."""
    node = node_id(writable[2], "services", "retried")

    def change(engine: EngineDatabase) -> None:
        ((text,),) = engine_rows(
            engine, "SELECT outputs FROM eri_executiondata WHERE node_id = ?", node
        )
        outputs = json.loads(text)
        outputs["_loop"] = outputs.get("_loop", 1) + 1 if outputs.get("_loop", 1) < 9 else 2
        new = json.dumps(outputs)
        assert len(new) == len(json.dumps(json.loads(text)))
        write(engine, "UPDATE eri_executiondata SET outputs = ? WHERE node_id = ?", new, node)

    first, after = cached_then_changed(writable, "services", "retried", change)
    loops = [
        values.from_message(o.value) for d in (first, after) for o in d.outputs if o.key == "_loop"
    ]
    assert loops[0] != loops[1]


def shared_stamps() -> float:
    return REGISTRY.get_sample_value("tasknode_store_shared_reads_total", {"query": "stamp"}) or 0.0


def outcome(served: Served, pipeline: str, label: str) -> pb.NodeDetail | grpc.StatusCode:
    """The node's reply with the elapsed times (which grow while a node runs) left out, or
    the code of its error (another test of this module deleted a task)."""
    try:
        detail = call(served, pipeline, label)
    except grpc.RpcError as exc:
        return exc.code()
    detail.ClearField("elapsed_seconds")
    for child in detail.children:
        child.ClearField("elapsed_seconds")
    return detail


def test_calls_at_once_share_stamp_statements_and_answer_as_alone(writable: Served) -> None:
    """Calls asking at once share a stamp statement (server.db.coalescing): one SELECT per
    key joined by UNION ALL. It reads what each key's statement alone reads, and replies
    stay those of calls made one at a time."""
    _, server, engine = writable
    asked = [
        (pipeline, label)
        for pipeline, entry in engine.manifest["pipelines"].items()
        for label in entry["nodes"]
    ]
    alone = {key: outcome(writable, *key) for key in asked}  # each built and cached
    store: Any = server.store
    keys = [
        (int(engine.manifest["pipelines"][p]["task_id"]), node_id(engine, p, label))
        for p, label in asked
    ]
    with store.session():
        together = store._read_stamps(keys)
        apart = {key: store._read_stamps([key]).get(key) for key in keys}
    assert len(together) > 10 and together == {k: v for k, v in apart.items() if v is not None}
    before = shared_stamps()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda key: outcome(writable, *key), asked * 10))
    assert answers == [alone[key] for key in asked * 10]
    assert shared_stamps() > before, "no call took its stamp from another's statement"


def test_a_batch_reads_its_stamps_in_one_statement(writable: Served) -> None:
    """BatchGetTaskNodeDetails on a bk-sops store reads every item's stamp before its first
    reply, in one statement (BksopsStore.stamp_ahead): a batch of cached replies over many
    tasks costs that statement alone, and answers as the single calls do."""
    stub, server, engine = writable
    items = [
        pb.GetTaskNodeDetailRequest(
            bk_biz_id=str(entry["business_id"]), task_id=str(entry["task_id"]), node_id=node["id"]
        )
        for entry in engine.manifest["pipelines"].values()
        for node in entry["nodes"].values()
    ][:100]
    first = stub.BatchGetTaskNodeDetails(
        pb.BatchGetTaskNodeDetailsRequest(requests=items), timeout=30
    )  # each reply built and cached, but a READY preview's (not cached: no stamp)
    items = [i for i, r in zip(items, first.results, strict=True) if r.detail.executed]
    assert len(items) > 10 and len({item.task_id for item in items}) > 3
    batch = pb.BatchGetTaskNodeDetailsRequest(requests=items)
    statements: list[str] = []
    store: Any = server.store

    def hook(event: QueryEvent) -> None:
        statements.append(event.sql)

    store.db.query_hooks.append(hook)
    try:
        before = hits()
        again = stub.BatchGetTaskNodeDetails(batch, timeout=30)
    finally:
        store.db.query_hooks.remove(hook)
    assert hits() - before == len(items)
    assert len(statements) == 1, statements  # the stamps; every reply a hit
    for item, result in zip(items, again.results, strict=True):
        alone = stub.GetTaskNodeDetail(item, timeout=30)
        for shown in (alone, result.detail):
            shown.ClearField("elapsed_seconds")
            for child in shown.children:
                child.ClearField("elapsed_seconds")
        assert result.detail == alone

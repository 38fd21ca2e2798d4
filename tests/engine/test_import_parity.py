"""A task the real engine ran, read through the bk-sops store, answers alike when loaded
from the import format; `make run` on a bk-sops database.

Kept apart from test_bksops_store.py: each server started here binds the models'
database (one per process), which must not change under that module's servers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb

from server.cli import DEMO_APP
from server.cli import DEMO_BUSINESS
from server.cli import load_demo_if_empty
from server.config import Config
from server.db.bksops import BksopsStore
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.connection import open_read_only
from server.db.models import ComponentSchema
from server.db.models import Task
from server.db.store import Store
from tests.conftest import ALL_APP
from tests.engine.conftest import EngineDatabase
from tests.engine.test_bksops_store import ask
from tests.engine.test_bksops_store import engine_two_tasks
from tests.engine.test_bksops_store import make_own_database
from tests.engine.test_bksops_store import node
from tests.engine.test_bksops_store import serving
from tests.engine.test_bksops_store import started
from tests.engine.test_bksops_store import walk
from tests.engine.to_import import task_record
from tests.engine.to_import import tree_of


@pytest.fixture(scope="module")
def converted(
    engine_database: EngineDatabase, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[tuple[pb.GetTaskNodeDetailRequest, pb.NodeDetail]], Any]]:
    """What a server on the engine's database answers for every node of every engine-2
    task (every loop, with and without component_code), and a stub of a native server
    whose own database holds those tasks converted to the import format
    (tests/engine/to_import.py). The servers run one after the other: the models'
    database is one per process."""
    engine = engine_database
    scratch = open_database(f"sqlite:///{tmp_path_factory.mktemp('scratch') / 'own.db'}")
    ensure_schema(scratch)
    reader = BksopsStore(open_read_only(engine.url), Store(scratch))
    records: list[dict[str, Any]] = []
    projects: dict[int, int] = {}
    asked: list[tuple[dict[str, Any], str, tuple[str, ...]]] = []
    for name, entry, snapshot in engine_two_tasks(engine):
        tree = tree_of(snapshot)
        records.append(
            task_record(
                reader, entry["business_id"], entry["task_id"], name, entry["project_id"], tree
            )
        )
        projects[entry["project_id"]] = entry["business_id"]
        asked.extend((entry, node_id, stack) for node_id, stack in walk(tree, ()))
    reader.close()
    answers = []
    with serving(engine, tmp_path_factory.mktemp("own")) as (engine_stub, _):
        for entry, node_id, stack in asked:
            base = pb.GetTaskNodeDetailRequest(
                bk_biz_id=str(entry["business_id"]),
                task_id=str(entry["task_id"]),
                node_id=node_id,
                subprocess_stack=stack,
            )
            first = engine_stub.GetTaskNodeDetail(base, timeout=30)
            requests = [base]
            requests += [
                pb.GetTaskNodeDetailRequest(loop=loop, **fields(base))
                for loop in range(1, first.loop)
            ]
            if first.component_code:
                requests += [
                    pb.GetTaskNodeDetailRequest(component_code=first.component_code, **fields(r))
                    for r in list(requests)
                ]
            answers += [(r, engine_stub.GetTaskNodeDetail(r, timeout=30)) for r in requests]
    config = Config(
        database_url=f"sqlite:///{tmp_path_factory.mktemp('native') / 'tasknode.db'}",
        grpc_addr="127.0.0.1:0",
    )
    projected = [{"id": p, "name": f"project {p}", "bk_biz_id": b} for p, b in projects.items()]
    make_own_database(config.database_url, engine, projected, records)
    with started(config, ALL_APP) as (native_stub, _):
        yield answers, native_stub


def test_a_task_loaded_from_its_import_record_answers_as_the_engine_read_one(
    converted: Any,
) -> None:
    """Every node of every task, every loop, with and without component_code: the native
    store, loaded from the import format, answers exactly what the bk-sops store does."""
    answers, native_stub = converted
    kinds = set()
    for request, from_engine in answers:
        from_file = native_stub.GetTaskNodeDetail(request, timeout=30)
        assert steady(from_file) == steady(from_engine), request
        kinds.add((from_engine.executed, bool(request.component_code), request.HasField("loop")))
    assert kinds == {
        (e, c, lp) for e in (True, False) for c in (True, False) for lp in (True, False)
    } - {(False, c, True) for c in (True, False)}


def fields(request: pb.GetTaskNodeDetailRequest) -> dict[str, Any]:
    return {
        "bk_biz_id": request.bk_biz_id,
        "task_id": request.task_id,
        "node_id": request.node_id,
        "subprocess_stack": list(request.subprocess_stack),
        **({"loop": request.loop} if request.HasField("loop") else {}),
    }


def steady(detail: pb.NodeDetail) -> pb.NodeDetail:
    """detail without the seconds that grow while something runs (and so its etag's
    hash may differ by a second between two calls)."""
    if not detail.HasField("finish_time"):
        detail.elapsed_seconds = 0
    for child in detail.children:
        if not child.HasField("finish_time"):
            child.elapsed_seconds = 0
    return detail


def test_make_run_on_a_bksops_database_creates_the_demo_app_in_an_empty_own_database(
    engine_database: EngineDatabase, tmp_path: Path
) -> None:
    """`make run` (serve --demo) with TASKNODE_BKSOPS_DATABASE_URL: the own database gets
    the demo app (esb_test, granted business 2) and the demo's schemas, not its tasks; the
    seed's credentials then read the engine's tasks of business 2, and no other."""
    engine = engine_database
    config = Config(
        database_url=f"sqlite:///{tmp_path / 'own.db'}",
        bksops_database_url=engine.url,
        grpc_addr="127.0.0.1:0",
    )
    assert load_demo_if_empty(config)
    assert not load_demo_if_empty(config)  # the next start adds nothing
    db = open_database(config.database_url)
    with db.connection_context():
        assert (Task.select().count(), ComponentSchema.select().count()) == (0, 4)
    db.close()
    with started(config, DEMO_APP) as (stub, _):
        entry, node_id = node(engine, "nested", "taken")
        assert entry["business_id"] == DEMO_BUSINESS
        detail = ask((stub, engine), "nested", "taken")
        assert (detail.id, detail.state) == (node_id, pb.NODE_STATE_FINISHED)
        with pytest.raises(grpc.RpcError) as caught:
            ask((stub, engine), "other_business", "act")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

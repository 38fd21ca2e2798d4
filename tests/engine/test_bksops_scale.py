"""The bk-sops scale generator (server.db.bksops_scale) writes rows the bk-sops store serves.

Into tables made by the real engine's migrations (tests.engine.harness.engine_schema), on each
store: every node the generator says it made is answered with its state, loop, histories and
children, through the store, its tree read from the compressed snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.db import bksops_scale
from server.db.bksops_scale import Made
from server.db.scale import COMPONENTS
from tests.conftest import STORES
from tests.conftest import fresh_database
from tests.engine.conftest import EngineDatabase
from tests.engine.harness import engine_schema
from tests.engine.test_bksops_store import serving

TASKS = 40
DECLARED = {code: keys for code, _, keys in COMPONENTS}


@pytest.fixture(scope="module", params=STORES)
def generated(
    request: pytest.FixtureRequest, engine_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[pb_grpc.TaskNodeServiceStub, list[Made]]]:
    directory = tmp_path_factory.mktemp(f"scale-{request.param}")
    with fresh_database(request.param, directory) as url:
        engine_schema(url, directory)
        db = bksops_scale.open_writer(url)
        made = bksops_scale.seed(db, TASKS, keep=True)
        assert bksops_scale.tasks_in(db) == TASKS
        close_all = getattr(db, "close_all", None)
        if close_all is not None:
            close_all()
        own = directory / "own"
        own.mkdir()
        engine = EngineDatabase(request.param, url, {"components": bksops_scale.schemas()})
        with serving(engine, own) as (stub, _):
            yield stub, made


def test_every_node_made_is_served_as_made(
    generated: tuple[pb_grpc.TaskNodeServiceStub, list[Made]],
) -> None:
    stub, made = generated
    assert len(made) > TASKS * 8
    kinds = {(m.state, m.histories > 0, m.children > 0) for m in made}
    assert {("FINISHED", True, False), ("FAILED", False, False), (None, False, False)} <= kinds
    assert any(m.children for m in made) and any(m.loop > 1 for m in made)
    for node in made:
        detail = stub.GetTaskNodeDetail(
            pb.GetTaskNodeDetailRequest(
                bk_biz_id=str(node.business),
                task_id=str(node.task_id),
                node_id=node.node_id,
                subprocess_stack=list(node.stack),
                component_code=node.code,
            ),
            timeout=30,
        )
        state = pb.NodeState.Name(detail.state)[len("NODE_STATE_") :]
        assert (state, detail.loop, len(detail.histories), len(detail.children)) == (
            node.state or "READY",
            node.loop if node.state else 0,  # a node not run shows no loop
            node.histories,
            node.children,
        ), node
        if node.code and node.state:  # the plugin's declared outputs, named, come first
            declared = [(key, name) for key, name in DECLARED[node.code]]
            shown = [(o.key, o.name) for o in detail.outputs][: len(declared)]
            assert shown == declared, node


def test_the_same_seed_makes_the_same_rows() -> None:
    one, two = bksops_scale.Generator(7), bksops_scale.Generator(7)
    for generator in (one, two):
        for _ in range(5):
            generator.task()
    assert one.rows.tables == two.rows.tables

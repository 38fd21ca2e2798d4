"""The store on its own: lookups, their errors, and what they return."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server import errors
from server.cli import load_demo_if_empty
from server.config import Config
from server.db.connection import open_database
from server.db.store import Store
from tests.conftest import SEED_NODE
from tests.conftest import SEED_PARENT

FAILED_NODE = "nodef1a2b3c4d5e6f708192a3b4c5d6e"
LOOP_NODE = "node4d5e6f708192a3b4c5d6e7f8091a"


@pytest.fixture
def store(demo_config: Config) -> Iterator[Store]:
    store = Store(open_database(demo_config.database_url))
    with store.session():
        yield store


def test_find_node_by_business(store: Store) -> None:
    node = store.find_node(2, False, 10, SEED_NODE)
    assert (node.task_id, node.node_id, node.path) == (10, SEED_NODE, (SEED_PARENT,))
    assert (node.state, node.loop, node.retry, node.version) == (
        "FINISHED",
        1,
        0,
        "23ac8c29f62b3337aafcf1f538d277f8",
    )
    assert node.started_at == 1547733757_000000
    assert node.finished_at == 1547733766_000000


def test_find_node_by_project_id(store: Store) -> None:
    assert store.find_node(1, True, 10, SEED_NODE).node_id == SEED_NODE
    with pytest.raises(errors.BusinessNotFound):
        store.find_node(2, True, 10, SEED_NODE)


@pytest.mark.parametrize(
    ("biz", "task", "node", "error", "message"),
    [
        (99, 10, SEED_NODE, errors.BusinessNotFound, r"project\(99\) with scope\(cmdb_biz\)"),
        (2, 99, SEED_NODE, errors.TaskNotFound, "task 99 of business 2 does not exist"),
        (3, 10, SEED_NODE, errors.TaskNotFound, "task 10 of business 3 does not exist"),
        (2, 12, "node6f708192a3b4c5d6e7f8091a2b3c", errors.TaskNotFound, "task 12 of"),
        (2, 10, "nodeunknown", errors.NodeNotFound, "node nodeunknown not found in task 10"),
        (2, 11, SEED_NODE, errors.NodeNotFound, "not found in task 11"),
    ],
)
def test_find_node_says_what_is_missing(
    store: Store, biz: int, task: int, node: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        store.find_node(biz, False, task, node)


def test_attempts_of_one_loop_oldest_first(store: Store) -> None:
    loop2 = store.attempts(11, LOOP_NODE, 2)
    assert [(a.loop, a.retry, a.state) for a in loop2] == [(2, 0, "FAILED"), (2, 1, "FINISHED")]
    assert store.attempts(11, LOOP_NODE, 3) == []
    failed = store.attempts(11, FAILED_NODE, 1)
    assert [a.retry for a in failed] == [0, 1]
    assert failed[1].state is None
    assert failed[0].id < failed[1].id


def test_children_are_direct_and_have_run(store: Store) -> None:
    children = store.children(10, SEED_PARENT)
    assert [c.node_id for c in children] == [SEED_NODE, "nodebbb1c2d3e4f5061728394a5b6c7d"]
    canary = store.children(10, "nodebbb1c2d3e4f5061728394a5b6c7d")
    assert [(c.name, c.state) for c in canary] == [
        ("Push to canary hosts", "FINISHED"),
        ("Watch canary for 10 minutes", "RUNNING"),
    ]


def test_output_schema_in_declared_order(store: Store) -> None:
    assert store.output_schema("job_fast_execute_script", "legacy") == [
        ("job_inst_id", "task ID"),
        ("job_inst_url", "link"),
        ("_result", "result"),
    ]
    with pytest.raises(errors.ComponentNotFound, match="no output schema at version v9"):
        store.output_schema("job_fast_execute_script", "v9")


def test_a_vanished_database_is_unavailable(sqlite_config: Config, tmp_path: Path) -> None:
    load_demo_if_empty(sqlite_config)
    store = Store(open_database(sqlite_config.database_url))
    for path in tmp_path.iterdir():
        path.unlink()
    tmp_path.rmdir()
    with pytest.raises(errors.StoreUnavailable), store.session():
        store.find_node(2, False, 10, SEED_NODE)


def test_ids_compare_exactly_on_every_store(store: Store) -> None:
    with pytest.raises(errors.NodeNotFound):
        store.find_node(2, False, 10, SEED_NODE.upper())
    with pytest.raises(errors.ComponentNotFound):
        store.output_schema("JOB_FAST_EXECUTE_SCRIPT", "legacy")

"""The scale generator: deterministic, shaped like the engine's records, loadable everywhere."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from server import values
from server.config import Config
from server.db import scale
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.models import Attempt
from server.db.models import Node
from server.db.models import Task
from server.db.store import Store

# Column positions in the generator's node and attempt rows (the models' column order).
NODE = {field.name: i for i, field in enumerate(scale.NODE_FIELDS)}
ATTEMPT = {field.name: i for i, field in enumerate(scale.ATTEMPT_FIELDS)}


def generate(seed: int, tasks: int) -> scale.Generator:
    generator = scale.Generator(seed)
    for _ in range(tasks):
        generator.task()
    return generator


def test_the_same_seed_makes_the_same_rows() -> None:
    first, again, other = generate(7, 20), generate(7, 20), generate(8, 20)
    assert (first.nodes, first.attempts) == (again.nodes, again.attempts)
    assert first.nodes[0][NODE["node_id"]] != other.nodes[0][NODE["node_id"]]


def test_tasks_are_shaped_like_the_engines() -> None:
    generator = generate(scale.SEED, 120)
    nodes, attempts = generator.nodes, generator.attempts
    per_task = Counter(row[NODE["task"]] for row in nodes)
    assert 50 <= sum(per_task.values()) / len(per_task) <= 100
    kinds = Counter(row[NODE["kind"]] for row in nodes)
    assert kinds["SubProcess"] and kinds["EmptyStartEvent"] == kinds["EmptyEndEvent"]
    assert {row[NODE["state"]] for row in nodes} == {"FINISHED", "FAILED", "RUNNING", None}
    ids = {(row[NODE["task"]], row[NODE["node_id"]]): row for row in nodes}
    assert len(ids) == len(nodes), "node ids are unique in their task"
    for row in nodes:
        path = json.loads(row[NODE["path"]])
        assert len(path) <= 2
        assert row[NODE["parent_node_id"]] == (path[-1] if path else "")
        if path:
            parent = ids[row[NODE["task"]], path[-1]]
            assert parent[NODE["kind"]] == "SubProcess"
            assert json.loads(parent[NODE["path"]]) == path[:-1]
    assert max(len(json.loads(row[NODE["path"]])) for row in nodes) == 2
    kinds_of_values = {
        type(value).__name__
        for row in nodes
        for value in values.loads(row[NODE["outputs"]]).values()
    }
    assert kinds_of_values == {"int", "float", "str", "NoneType", "list", "dict", "bool"}
    # The earlier attempts agree with the node: a retried node has one per retry in its
    # loop; a looped node has the final run of each older loop.
    history = Counter((row[ATTEMPT["task"]], row[ATTEMPT["node_id"]]) for row in attempts)
    looped = retried = 0
    for key, count in history.items():
        node = ids[key]
        if node[NODE["loop"]] > 1:
            looped += 1
            assert count == node[NODE["loop"]] - 1
        else:
            retried += 1
            assert count == node[NODE["retry"]]
    assert looped and retried


def test_seed_fills_an_empty_store_and_refuses_a_full_one(config: Config) -> None:
    db = open_database(config.database_url)
    ensure_schema(db)
    written = scale.seed(db, tasks=3, nodes=None)
    expected = generate(scale.SEED, 3)
    with db.connection_context():
        counts = (Task.select().count(), Node.select().count(), Attempt.select().count())
    assert counts == (3, len(expected.nodes), len(expected.attempts))
    assert written == sum(counts) + scale.BUSINESSES + len(scale.Generator(0).components())
    store = Store(db)
    with store.session():
        for row in expected.nodes:
            biz = scale.FIRST_ID + (row[NODE["task"]] - scale.FIRST_ID) % scale.BUSINESSES
            found = store.find_node(biz, False, row[NODE["task"]], row[NODE["node_id"]])
            assert (found.state, found.inputs) == (row[NODE["state"]], row[NODE["inputs"]])
    with pytest.raises(SystemExit, match="already holds tasks"):
        scale.seed(db, tasks=1, nodes=None)

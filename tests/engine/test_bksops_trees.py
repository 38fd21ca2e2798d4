"""The bk-sops store's kept task trees: bounded by bytes, not by count, and never parsed twice
while kept.

A call finds its node in its task's tree (the zlib JSON snapshot row), which the store
decompresses and indexes once and keeps (in a server.lru.SizedLRU). On each store, over a
database of the scale generator's tasks (more than the 256 trees the store once kept by
count): a bound of a few MiB keeps every tree, and calls on every node of every task then
parse none again; a bound of a few trees' bytes keeps the most recently used trees that fit,
and only an evicted tree is parsed again; the bytes counted are about what the trees hold.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

import pytest

from server import errors
from server.db import bksops_scale
from server.db.bksops import BksopsStore
from server.db.bksops_scale import Made
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.connection import open_read_only
from server.db.store import Store
from tests.conftest import STORES
from tests.conftest import fresh_database
from tests.engine.harness import engine_schema

#: More tasks than the 256 trees the store kept by count before its bound was in bytes.
TASKS = 300
MIB = 1024 * 1024

Generated = tuple[str, str, list[Made], dict[int, int]]


@pytest.fixture(scope="module", params=STORES)
def generated(
    request: pytest.FixtureRequest, engine_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Generated]:
    """(engine URL, own URL, every node made, task id -> snapshot id) of TASKS tasks."""
    directory = tmp_path_factory.mktemp(f"trees-{request.param}")
    with fresh_database(request.param, directory) as url:
        engine_schema(url, directory)
        db = bksops_scale.open_writer(url)
        made = bksops_scale.seed(db, TASKS, keep=True)
        close_all = getattr(db, "close_all", None)
        if close_all is not None:
            close_all()
        reader = open_read_only(url)
        with reader.connection_context():
            snapshots = {
                int(task): int(snapshot)
                for task, snapshot in reader.execute_sql(
                    "SELECT t.id, i.execution_snapshot_id FROM taskflow3_taskflowinstance t"
                    " JOIN pipeline_pipelineinstance i ON i.id = t.pipeline_instance_id"
                ).fetchall()
            }
        getattr(reader, "close_all", reader.close)()
        own = f"sqlite:///{directory / 'own.db'}"
        ensure_schema(open_database(own))
        yield url, own, made, snapshots


def store_on(generated: Generated, max_bytes: int) -> BksopsStore:
    url, own, _, _ = generated
    return BksopsStore(open_read_only(url), Store(open_database(own)), tree_cache_bytes=max_bytes)


def call(store: BksopsStore, nodes: list[Made]) -> None:
    """Find each node (as GetTaskNodeDetail does first), each in a session of its own."""
    for node in nodes:
        with store.session():
            found = store.find_node(node.business, False, node.task_id, node.node_id)
            store.end_snapshot()
        assert found.node_id == node.node_id and found.path == node.stack


def first_of_each_task(made: list[Made]) -> list[Made]:
    return [next(nodes) for _, nodes in groupby(made, key=lambda m: m.task_id)]


def test_a_bound_in_bytes_keeps_every_small_tree_and_a_kept_tree_is_never_parsed_again(
    generated: Generated,
) -> None:
    _, _, made, snapshots = generated
    store = store_on(generated, 16 * MIB)
    firsts = first_of_each_task(made)
    assert len(firsts) == TASKS
    call(store, firsts)
    assert store.trees_parsed == TASKS
    assert len(store.trees) == TASKS  # all kept: more than the old bound of 256 trees
    assert all(snapshots[task] in store.trees for task in snapshots)
    assert 0 < store.trees.bytes <= 16 * MIB
    call(store, made)  # every node of every task, its tree kept
    assert store.trees_parsed == TASKS
    store.close()


def test_the_bound_evicts_the_least_recently_used_trees_by_their_bytes(
    generated: Generated,
) -> None:
    _, _, made, snapshots = generated
    firsts = first_of_each_task(made)
    measuring = store_on(generated, 16 * MIB)
    call(measuring, firsts)
    kept = {task: measuring.trees.get(snapshots[task]) for task in snapshots}
    sizes = {task: tree.size for task, tree in kept.items() if tree is not None}
    assert len(sizes) == TASKS
    measuring.close()
    assert min(sizes.values()) > 500  # a tree's ids, names and inputs: not free
    # Room for the last ten trees called, not for the eleventh before them.
    last = [node.task_id for node in firsts[-10:]]
    bound = sum(sizes[task] for task in last) + sizes[firsts[-11].task_id] - 1
    store = store_on(generated, bound)
    call(store, firsts)
    assert store.trees_parsed == TASKS
    assert store.trees.bytes <= bound
    assert {task for task in snapshots if snapshots[task] in store.trees} == set(last)
    call(store, [node for node in made if node.task_id in last])  # kept: none parsed again
    assert store.trees_parsed == TASKS
    call(store, firsts[:1])  # evicted: parsed again, and kept, the oldest out
    assert store.trees_parsed == TASKS + 1
    assert snapshots[firsts[0].task_id] in store.trees
    assert store.trees.bytes <= bound
    assert snapshots[last[0]] not in store.trees
    store.close()


def test_the_bytes_counted_are_what_the_trees_hold(generated: Generated) -> None:
    _, _, made, _ = generated
    firsts = first_of_each_task(made)
    store = store_on(generated, 16 * MIB)
    call(store, firsts[:1])  # connections, statements and metrics made before measuring
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        call(store, firsts[1:])
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    counted = store.trees.bytes * (TASKS - 1) / TASKS
    assert 0.7 * held <= counted <= 1.3 * held, (counted, held)
    store.close()


def test_a_tree_over_the_bound_is_served_and_not_kept(generated: Generated) -> None:
    _, _, made, _ = generated
    store = store_on(generated, 100)  # less than any tree
    call(store, made[:3])
    assert len(store.trees) == 0 and store.trees.bytes == 0
    with store.session(), pytest.raises(errors.NodeNotFound):
        store.find_node(made[0].business, False, made[0].task_id, "node-not-there")
    store.close()

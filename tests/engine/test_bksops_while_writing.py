"""Every answer is one moment of the engine's database, read while the real engine writes it.

The engine loops a node (`long_loop`: body -> exclusive gateway -> body, PASSES times) while
the service, its reply cache on, answers GetTaskNodeDetail for the node over and over. Each
pass is several transactions, in this order (bamboo_engine.engine.Engine.execute, then
bamboo_engine.handlers.service_activity; Django autocommits each):

1. add_history: a history row of loop N, a copy of the state (its version) and of the data;
2. set_state RUNNING: loop N+1, a new version, a new start time;
3. set_state FINISHED: its finish time (the service succeeded);
4. the context values its outputs feed;
5. set_execution_data: the outputs of pass N+1 (`_loop` N+1, shown under the root constant
   it feeds, `count`).

So at every committed moment: the outputs' loop is the state's loop or one less (from 2 to
5; none before the first pass's data); a RUNNING node's outputs are the previous pass's; a
history of the current loop exists only from 1 to 2, when the state is FINISHED with the
history's version and the outputs are of its loop. An answer that took the state from one
moment and the data or histories from another (a later one: the store reads the state first)
breaks one of these. And an answer is never older than the node's state row read just before
the call: a reply cached earlier is not served once the engine moved on.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from bksops.tasknode.v1 import task_node_pb2 as pb
from peewee import Database
from peewee import MySQLDatabase

from server import values
from tests.engine.conftest import EngineDatabase
from tests.engine.harness import open_reader
from tests.engine.harness import writing_pipelines
from tests.engine.test_bksops_store import serving

PASSES = 30
#: Seconds between calls: a caller polling flat out slows the engine ~3x on 2 shared cores.
PAUSE = 0.002
STATES = {"RUNNING": pb.NODE_STATE_RUNNING, "FINISHED": pb.NODE_STATE_FINISHED}


def outputs_loop(detail: pb.NodeDetail) -> int | None:
    """The `_loop` of the node's outputs (shown as `count`, the constant it feeds)."""
    found = {o.key: values.from_message(o.value) for o in detail.outputs}
    value = found.get("count", found.get("_loop"))
    return None if value is None else int(value)


def one_moment(detail: pb.NodeDetail) -> str | None:
    """Why detail cannot be one committed moment of the loop (see the module), or None."""
    loop, state, data_loop = detail.loop, detail.state, outputs_loop(detail)
    if data_loop is not None and data_loop not in (loop, loop - 1):
        return f"outputs of loop {data_loop} with the state of loop {loop}"
    if state == pb.NODE_STATE_RUNNING and data_loop == loop:
        return f"RUNNING in loop {loop} with that loop's outputs"
    if detail.histories:
        attempt = detail.histories[0]
        if len(detail.histories) > 1 or attempt.loop != loop:
            return f"histories of loops {[h.loop for h in detail.histories]} in loop {loop}"
        if (state, attempt.version, data_loop) != (pb.NODE_STATE_FINISHED, detail.version, loop):
            return f"a history of loop {loop} while {pb.NodeState.Name(state)}"
    return None


def task_of(reader: Database, node_id: str, process: subprocess.Popen[bytes]) -> int:
    """The task whose pipeline runs node_id, once the engine has begun running it (the task
    row is written before the pipeline starts; the manifest announces the loop earlier)."""
    sql = (
        "SELECT t.id FROM eri_state s"
        " JOIN pipeline_pipelineinstance i ON i.instance_id = s.root_id"
        " JOIN taskflow3_taskflowinstance t ON t.pipeline_instance_id = i.id"
        f" WHERE s.node_id = {reader.param}"
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        with reader.connection_context():
            row = reader.execute_sql(sql, (node_id,)).fetchone()
        if row is not None:
            return int(row[0])
        time.sleep(0.01)
    raise AssertionError("the engine never ran the loop's node")


def test_answers_are_one_moment_while_the_engine_writes(
    database_url: str, engine_venv: Path, tmp_path: Path
) -> None:
    seen: list[tuple[int, int, int]] = []
    answers: list[pb.NodeDetail] = []
    broken: list[str] = []
    with writing_pipelines(database_url, tmp_path, PASSES) as (manifest, process):
        engine = EngineDatabase(database_url.split(":", 1)[0], database_url, manifest)
        body = manifest["pipelines"]["long_loop"]["nodes"]["body"]["id"]
        reader = open_reader(database_url)
        quote = "`" if isinstance(reader, MySQLDatabase) else '"'
        sql = f"SELECT name, {quote}loop{quote} FROM eri_state WHERE node_id = {reader.param}"
        request = pb.GetTaskNodeDetailRequest(
            bk_biz_id=str(manifest["business_id"]),
            task_id=str(task_of(reader, body, process)),
            node_id=body,
        )
        own = tmp_path / "own"
        own.mkdir()
        with serving(engine, own) as (stub, server):
            assert server.cache is not None
            while process.poll() is None:
                with reader.connection_context():
                    row: Any = reader.execute_sql(sql, (body,)).fetchone()
                detail = stub.GetTaskNodeDetail(request, timeout=30)
                if row is not None:
                    name, loop = row
                    older = detail.loop < loop or (
                        detail.loop == loop
                        and name == "FINISHED"
                        and detail.state != pb.NODE_STATE_FINISHED
                    )
                    if older:
                        broken.append(f"older than the row read before: {name} {loop}")
                answers.append(detail)
                shape = (detail.loop, detail.state, len(detail.histories))
                if not seen or seen[-1] != shape:
                    seen.append(shape)
                time.sleep(PAUSE)
            final = stub.GetTaskNodeDetail(request, timeout=30)
    assert (final.loop, final.state, outputs_loop(final)) == (
        PASSES,
        pb.NODE_STATE_FINISHED,
        PASSES,
    )
    broken += [why for why in (one_moment(a) for a in answers) if why]
    assert not broken, broken[:10]
    loops = {loop for loop, _, _ in seen}
    assert len(loops) >= 3, f"too few passes seen while the engine wrote: {seen}"
    assert {state for _, state, _ in seen} >= set(STATES.values()), seen

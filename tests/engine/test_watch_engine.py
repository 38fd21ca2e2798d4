"""Watch streams on the bk-sops store, while the real engine writes (it, not us).

The engine loops a node (tests.engine.harness.writing_pipelines) in a database of each
store; a server reads that database as a bk-sops store and a WatchTaskNode and a
WatchTask stream follow the node as the engine moves it, pass by pass. Then the engine
polls a node: RUNNING throughout, its state row untouched, the engine rewrites its
outputs at each schedule, and a WatchTaskNode stream must be sent each of them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from playhouse import db_url

from server import values
from server.config import Config
from server.metrics import REGISTRY
from server.watch.service import WatchServer
from server.watch.service import serve_watch
from tests.conftest import ALL_APP
from tests.engine.conftest import EngineDatabase
from tests.engine.harness import open_reader
from tests.engine.harness import writing_pipelines
from tests.engine.test_bksops_store import serving
from tests.engine.test_bksops_while_writing import outputs_loop

PASSES = 100
INTERVAL = 0.02
#: Schedules of the polling node, and seconds between two (many watch intervals).
POLLS = 8
POLL_PAUSE = 0.3
#: Streams opened beside the two followed, never read: the poll must not grow with them.
IDLE_STREAMS = 20


def _task_of(url: str, pipeline: str, deadline: float) -> int:
    """The task bk-sops links to the pipeline instance named pipeline, once it exists."""
    # Not open_reader: for a server database it binds the models, which the running
    # server's own database must keep.
    db = open_reader(url) if url.startswith("sqlite") else db_url.connect(url)
    sql = (
        "SELECT t.id FROM taskflow3_taskflowinstance t JOIN pipeline_pipelineinstance i"
        f" ON i.id = t.pipeline_instance_id WHERE i.name = {db.param}"
    )
    while time.monotonic() < deadline:
        with db.connection_context():
            row = db.execute_sql(sql, (pipeline,)).fetchone()
        if row is not None:
            return int(row[0])
        time.sleep(0.01)
    raise AssertionError(f"no task for {pipeline}")


@contextmanager
def _watched(
    database_url: str, tmp_path: Path, pipeline: str, passes: int, **writing: Any
) -> Iterator[tuple[dict[str, Any], int, pb_grpc.TaskNodeServiceStub, WatchServer]]:
    """The real engine running its pipelines (passes, writing: as writing_pipelines takes
    them) into database_url while a server and its watch server serve that database: the
    engine's manifest, pipeline's task id, a stub of the watch server, and the watch server.
    The engine must then finish cleanly."""
    store = database_url.split(":", 1)[0]
    with writing_pipelines(database_url, tmp_path, passes, **writing) as (manifest, process):
        engine = EngineDatabase(store, database_url, manifest)
        own = tmp_path / "own"
        own.mkdir()
        with serving(engine, own) as (_, server):
            config = Config(
                grpc_addr="127.0.0.1:0", watch_addr="127.0.0.1:0", watch_interval=INTERVAL
            )
            watch = serve_watch(config, server)
            assert watch is not None
            try:
                task_id = _task_of(database_url, pipeline, time.monotonic() + 60)
                with grpc.insecure_channel(f"127.0.0.1:{watch.port}") as channel:
                    yield manifest, task_id, pb_grpc.TaskNodeServiceStub(channel), watch
            finally:
                watch.stop(0)
        assert process.wait(timeout=120) == 0


def test_streams_follow_the_engine_as_it_loops_a_node(
    database_url: str, engine_venv: Path, tmp_path: Path
) -> None:
    node_loops: list[tuple[int, int]] = []
    task_loops: list[int] = []
    with _watched(database_url, tmp_path, "long_loop", PASSES) as (manifest, task_id, stub, _):
        body = manifest["pipelines"]["long_loop"]["nodes"]["body"]["id"]
        business = str(manifest["business_id"])
        metadata = [("x-bkapi-authorization", json.dumps(ALL_APP))]
        node_stream = stub.WatchTaskNode(
            pb.WatchTaskNodeRequest(
                node=pb.GetTaskNodeDetailRequest(
                    bk_biz_id=business, task_id=str(task_id), node_id=body
                )
            ),
            metadata=metadata,
            timeout=120,
        )
        task_stream = stub.WatchTask(
            pb.WatchTaskRequest(bk_biz_id=business, task_id=str(task_id)),
            metadata=metadata,
            timeout=120,
        )

        def follow_task() -> None:
            for message in task_stream:
                for shown in message.nodes:
                    if shown.id == body:
                        task_loops.append(shown.loop)
                        if _done(shown):
                            return

        follower = threading.Thread(target=follow_task)
        follower.start()
        for message in node_stream:
            if message.HasField("detail"):
                node_loops.append((message.detail.loop, message.detail.state))
                # The engine writes a pass's outputs after its FINISHED state:
                # the stream must be sent them too.
                if _done(message.detail) and outputs_loop(message.detail) == PASSES:
                    break
        node_stream.cancel()
        follower.join(60)
        task_stream.cancel()
    loops = [loop for loop, _ in node_loops]
    assert node_loops[-1] == (PASSES, pb.NODE_STATE_FINISHED)
    assert loops == sorted(loops), node_loops
    assert len(set(loops)) >= 3, f"the stream saw the engine move only through {node_loops}"
    assert task_loops[-1] == PASSES and task_loops == sorted(task_loops)
    assert len(set(task_loops)) >= 3, task_loops


def _done(node: Any) -> bool:
    return bool(node.loop == PASSES and node.state == pb.NODE_STATE_FINISHED)


def _queries(name: str) -> float:
    """Store reads of kind name so far in this process (server.metrics)."""
    value = REGISTRY.get_sample_value(
        "tasknode_store_query_duration_seconds_count", {"query": name}
    )
    return value or 0.0


def _polled(detail: pb.NodeDetail) -> int | None:
    found = {o.key: values.from_message(o.value) for o in detail.outputs}
    value = found.get("polled")
    return None if value is None else int(value)


def test_a_running_node_whose_outputs_the_engine_rewrites_is_sent_each_of_them(
    database_url: str, engine_venv: Path, tmp_path: Path
) -> None:
    """The engine's polling service stays RUNNING (same state row, same version) while each
    schedule rewrites its eri_executiondata: the WatchTaskNode stream gets each new output;
    the WatchTask stream, whose summaries hold no outputs, nothing more than the node's
    state changes; and the poll stays two statements whatever the number of streams."""
    node_seen: list[tuple[int, int | None]] = []
    task_seen: list[int] = []
    polling = {"poll_passes": POLLS, "poll_pause": POLL_PAUSE}
    with _watched(database_url, tmp_path, "long_poll", 0, **polling) as (
        manifest,
        task_id,
        stub,
        watch,
    ):
        node = manifest["pipelines"]["long_poll"]["nodes"]["poll"]["id"]
        business = str(manifest["business_id"])
        metadata = [("x-bkapi-authorization", json.dumps(ALL_APP))]
        node_request = pb.WatchTaskNodeRequest(
            node=pb.GetTaskNodeDetailRequest(bk_biz_id=business, task_id=str(task_id), node_id=node)
        )
        task_request = pb.WatchTaskRequest(bk_biz_id=business, task_id=str(task_id))
        idle = [
            stub.WatchTaskNode(node_request, metadata=metadata, timeout=120)
            for _ in range(IDLE_STREAMS // 2)
        ] + [
            stub.WatchTask(task_request, metadata=metadata, timeout=120)
            for _ in range(IDLE_STREAMS // 2)
        ]
        node_stream = stub.WatchTaskNode(node_request, metadata=metadata, timeout=120)
        task_stream = stub.WatchTask(task_request, metadata=metadata, timeout=120)
        polls = watch.hub.polls
        statements = _queries("watch_tasks") + _queries("watch_states")
        stamps = _queries("stamp")

        def follow_task() -> None:
            for message in task_stream:
                for shown in message.nodes:
                    if shown.id == node:
                        task_seen.append(shown.state)
                        if shown.state == pb.NODE_STATE_FINISHED:
                            return

        follower = threading.Thread(target=follow_task)
        follower.start()
        for message in node_stream:
            if message.HasField("detail"):
                node_seen.append((message.detail.state, _polled(message.detail)))
                if message.detail.state == pb.NODE_STATE_FINISHED:
                    break
        node_stream.cancel()
        follower.join(60)
        task_stream.cancel()
        polls = watch.hub.polls - polls
        statements = _queries("watch_tasks") + _queries("watch_states") - statements
        stamps = _queries("stamp") - stamps
        for stream in idle:
            stream.cancel()
    running = [
        polled
        for state, polled in node_seen
        if state == pb.NODE_STATE_RUNNING and polled is not None
    ]
    assert node_seen[-1] == (pb.NODE_STATE_FINISHED, POLLS), node_seen
    assert running == sorted(running), node_seen
    # Each schedule lasts 15 intervals: a stream told of data changes sees nearly all.
    assert len(set(running)) >= POLLS // 2, f"RUNNING with outputs {running} only"
    # The task's summaries (no outputs) change only with the node's state: one each.
    assert task_seen.count(pb.NODE_STATE_RUNNING) <= 1, task_seen
    assert task_seen[-1] == pb.NODE_STATE_FINISHED, task_seen
    # Two statements a poll (the tasks, then their nodes' state and data) for 22 streams,
    # give or take the poll under way at either count; and one re-read of the watched
    # rendering per change (its stamp: the cache's), not one per stream.
    assert statements <= 2 * (polls + 1), (statements, polls)
    assert stamps <= 2 * (POLLS + 4), stamps

"""gRPC from several processes on one port."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server.config import Config
from server.workers import Workers
from server.workers import worker_count
from tests.conftest import authorized
from tests.conftest import seed_request
from tests.processes import start_server


@pytest.fixture
def workers(demo_config: Config) -> Iterator[Workers]:
    group = Workers(dataclasses.replace(demo_config, grpc_processes=2), 2)
    group.start()
    yield group
    group.stop(5)


def call_many(port: int, connections: int) -> int:
    """Successful seed calls, each on a new connection (spread by SO_REUSEPORT)."""
    served = 0
    for _ in range(connections):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
            served += stub.GetTaskNodeDetail(seed_request(), timeout=10).id != ""
    return served


def test_workers_share_one_port(workers: Workers) -> None:
    assert workers.port > 0
    assert call_many(workers.port, 10) == 10
    alive = [p for p in workers._processes if p is not None and p.is_alive()]
    assert len(alive) == 2


def test_a_dead_worker_is_started_again(workers: Workers) -> None:
    first = workers._processes[0]
    assert first is not None and first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    first.join(5)
    watcher = threading.Thread(target=workers.watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        again = workers._processes[0]
        if again is not None and again is not first and again.is_alive():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the dead worker was not started again")
    time.sleep(2)  # let it bind
    assert call_many(workers.port, 6) == 6


def test_one_process_per_core_by_default() -> None:
    assert worker_count(Config()) == len(os.sched_getaffinity(0))
    assert worker_count(Config(grpc_processes=3)) == 3


def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    env = {
        "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite",
        "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
        "TASKNODE_HTTP_ADDR": "",
        "TASKNODE_GRPC_PROCESSES": "2",
    }
    parent, _ = start_server(["serve", "--demo"], env, re.compile("serving"))
    assert parent.stdout is not None
    listed = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text()
    children = [int(pid) for pid in listed.split()]
    assert len(children) >= 2
    parent.kill()
    parent.wait(10)
    parent.stdout.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(c) for c in children):
        time.sleep(0.1)
    alive = [c for c in children if _alive(c)]
    assert not alive, f"workers outlived their parent: {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

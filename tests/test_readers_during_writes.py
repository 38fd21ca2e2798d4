"""Readers during an import: each call sees a task entirely before or after a rewrite.

A writer thread re-imports one task again and again, changing everything about
its nodes together (name, version, inputs, outputs, the number of attempts and of
children, all derived from a revision number), while reader threads call
GetTaskNodeDetail through the real server. A reply that mixes two revisions, an
error, or a node missing mid-rewrite fails the test. The server's reply cache is
off, so that every call reads the store.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server import values
from server.app import Server
from server.app import create_server
from server.config import Config
from tests import documents
from tests.conftest import ALL_APP
from tests.conftest import authorized
from tests.documents import attempt
from tests.documents import node
from tests.documents import request
from tests.documents import subprocess

TASK = 800
REVISIONS = 30
READERS = 4
#: However the threads are scheduled, the test ends within this many seconds.
DEADLINE = 30.0


def revision(n: int) -> dict[str, Any]:
    """The import file of revision n: every field a reader checks says n."""
    mark = {"revision": n}
    step = node(
        "step",
        name=f"step r{n}",
        inputs=mark,
        outputs=mark,
        execution={"state": "FINISHED", "version": f"r{n}", "retry": n % 4 + 1},
        attempts=[attempt(1, k, version=f"r{n}", inputs=mark) for k in range(n % 4 + 1)],
    )
    children = [
        node(
            f"child{k}", name=f"child{k} r{n}", execution={"state": "FINISHED", "version": f"r{n}"}
        )
        for k in range(n % 3 + 2)
    ]
    sub = subprocess(
        "sub", children, name=f"sub r{n}", execution={"state": "FINISHED", "version": f"r{n}"}
    )
    return documents.document(documents.task(TASK, step, sub))


def revision_of_step(detail: pb.NodeDetail) -> int:
    """The one revision the step's reply shows; AssertionError if it shows two."""
    n = values.object_from_message(detail.inputs)["revision"]
    assert detail.name == f"step r{n}"
    assert detail.version == f"r{n}"
    assert [values.from_message(o.value) for o in detail.outputs] == [n]
    assert len(detail.histories) == n % 4 + 1
    for earlier in detail.histories:
        assert earlier.version == f"r{n}"
        assert values.object_from_message(earlier.inputs) == {"revision": n}
    return int(n)


def revision_of_sub(detail: pb.NodeDetail) -> int:
    n = int(detail.version.removeprefix("r"))
    assert detail.name == f"sub r{n}"
    assert [c.name for c in detail.children] == [f"child{k} r{n}" for k in range(n % 3 + 2)]
    assert {c.version for c in detail.children} == {f"r{n}"}
    return n


@pytest.fixture
def uncached(demo_config: Config) -> Iterator[tuple[Server, pb_grpc.TaskNodeServiceStub]]:
    """A started server without a reply cache, and a stub calling it as ALL_APP."""
    server = create_server(dataclasses.replace(demo_config, reply_cache_mb=0))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, pb_grpc.TaskNodeServiceStub(authorized(channel, ALL_APP))
    finally:
        server.stop(None)


def test_readers_never_see_half_an_import(
    uncached: tuple[Server, pb_grpc.TaskNodeServiceStub],
) -> None:
    server, all_stub = uncached
    db = server.store.db
    documents.load(db, revision(0))
    writing = threading.Event()
    writing.set()
    problems: list[str] = []
    seen: set[tuple[str, int]] = set()
    deadline = time.monotonic() + DEADLINE

    def write() -> None:
        try:
            for n in range(1, REVISIONS + 1):
                documents.load(db, revision(n))
        except Exception as exc:  # reported by the test, not lost in the thread
            problems.append(f"writer: {exc!r}")
        finally:
            writing.clear()

    def read() -> None:
        checks = (
            (request(TASK, "step"), revision_of_step),
            (request(TASK, "sub"), revision_of_sub),
        )
        while writing.is_set() and time.monotonic() < deadline:
            for call, check in checks:
                try:
                    detail = all_stub.GetTaskNodeDetail(call, timeout=10)
                    seen.add((detail.id, check(detail)))
                except grpc.RpcError as exc:
                    problems.append(f"{call.node_id}: {exc.code()} {exc.details()}")
                except AssertionError as exc:
                    problems.append(f"{call.node_id}: mixed revisions: {exc}")

    threads = [threading.Thread(target=read) for _ in range(READERS)]
    threads.append(threading.Thread(target=write))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE + 10)
    assert not writing.is_set(), "the writer did not finish in time"
    assert problems == []
    assert len({n for node_id, n in seen if node_id == "step"}) > 1, "reads did not overlap writes"
    final = all_stub.GetTaskNodeDetail(request(TASK, "step"), timeout=10)
    assert revision_of_step(final) == REVISIONS

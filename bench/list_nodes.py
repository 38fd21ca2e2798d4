"""ListTaskNodes on a task of 100,000 nodes: the first page against the last.

    .venv/bin/python -m bench.list_nodes [--nodes 100000] [--calls 50] [--database-url URL]
    .venv/bin/python -m bench.run --only list-nodes

In one process, no network: ListTaskNodes' handler (interceptors, authentication, the
servicer) is called directly on a fresh SQLite file (or an empty --database-url)
holding the demo data and one more task of business 2 with --nodes nodes: 1,000 at
the root, 99 of them sub-processes of equal shares of the rest. A page's token is
reached by walking the listing; each page is then asked for --calls times and the
median printed, for the whole task (keyset on the row id), a filter that keeps one
node in ten, and the children of one sub-process (keyset on the position).
total_size (a COUNT of what the filter keeps) is part of every page.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bksops.tasknode.v1 import task_node_pb2 as pb
from peewee import MySQLDatabase

from server.app import create_server
from server.cli import DEMO_APP
from server.cli import load_demo_if_empty
from server.config import Config
from server.db.connection import open_database
from server.db.models import Node
from server.db.models import Task
from server.gateway.local import LocalContext

LIST = "/bksops.tasknode.v1.TaskNodeService/ListTaskNodes"
AUTH = (("x-bkapi-authorization", json.dumps(DEMO_APP)),)
TASK = 95
ROOT_NODES = 1000
SUBPROCESSES = 99
PAGE = 50
#: 2024-01-01T00:00:00Z, in microseconds.
EPOCH = 1_704_067_200_000_000


def node_rows(total: int) -> list[dict[str, Any]]:
    """The task's node rows, breadth first (the order a load stores them in)."""
    rows: list[dict[str, Any]] = []
    subs = [f"sub{i:04}" for i in range(SUBPROCESSES)]

    def row(node_id: str, parent: str, path: list[str], position: int, kind: str) -> None:
        n = len(rows)
        rows.append(
            {
                "task": TASK,
                "node_id": node_id,
                "parent_node_id": parent,
                "path": json.dumps(path),
                "position": position,
                "name": f"node {n}",
                "kind": kind,
                "component_code": "" if kind == "SubProcess" else f"plugin{n % 7}",
                "state": "FAILED" if n % 10 == 3 else "FINISHED",
                "loop": 1 + n % 3,
                "retry": n % 4,
                "version": f"{n:032x}",
                "started_at": EPOCH + n * 1_000_000,
                "finished_at": EPOCH + n * 1_000_000 + 500_000,
                "inputs": '{"x":1}',
                "outputs": '{"y":2}',
            }
        )

    step = ROOT_NODES // SUBPROCESSES  # a sub-process every step nodes at the root
    for i in range(ROOT_NODES):
        if i % step == 0 and i // step < SUBPROCESSES:
            row(subs[i // step], "", [], i, "SubProcess")
        else:
            row(f"root{i:05}", "", [], i, "ServiceActivity")
    share = (total - ROOT_NODES) // SUBPROCESSES
    for s, sub in enumerate(subs):
        count = share if s < SUBPROCESSES - 1 else total - ROOT_NODES - share * s
        for j in range(count):
            row(f"{sub}c{j:05}", sub, [sub], j, "ServiceActivity")
    return rows


def seed(url: str, total: int) -> None:
    load_demo_if_empty(Config(database_url=url))
    db = open_database(url)
    with db.connection_context(), db.atomic():
        Task.insert(id=TASK, project=1, name="100k nodes", digest="bench").execute()
        rows = node_rows(total)
        for start in range(0, len(rows), 1000):
            Node.insert_many(rows[start : start + 1000]).execute()
    with db.connection_context():
        mysql = isinstance(db, MySQLDatabase)
        db.execute_sql(f"ANALYZE TABLE {Node._meta.table_name}" if mysql else "ANALYZE")
    db.close()


def median_ms(work: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(total: int, calls: int, url: str = "") -> list[tuple[str, float, float, int]]:
    """(listing, first page ms, last page ms, total_size) for each listing measured, on
    url (an empty database) or a fresh SQLite file."""
    if not url:
        with tempfile.TemporaryDirectory() as directory:
            return measure(total, calls, f"sqlite:///{Path(directory) / 'bench.db'}")
    results: list[tuple[str, float, float, int]] = []
    seed(url, total)
    server = create_server(Config(database_url=url, grpc_addr="127.0.0.1:0"))
    handler = server.handlers[LIST].unary_unary
    assert handler is not None

    def call(request: pb.ListTaskNodesRequest) -> pb.ListTaskNodesResponse:
        reply = handler(request, LocalContext(AUTH, time.monotonic() + 60))
        assert isinstance(reply, pb.ListTaskNodesResponse)
        return reply

    try:
        shapes: tuple[tuple[str, dict[str, Any]], ...] = (
            ("whole task", {}),
            ("filter state = FAILED", {"filter": "state = FAILED"}),
            ("children of one sub-process", {"subprocess_stack": ["sub0050"]}),
        )
        for name, fields in shapes:
            first = pb.ListTaskNodesRequest(
                bk_biz_id="2", task_id=str(TASK), page_size=PAGE, **fields
            )
            last = _last_page(call, first)
            reply = call(first)
            results.append(
                (
                    name,
                    median_ms(partial(call, first), calls),
                    median_ms(partial(call, last), calls),
                    reply.total_size,
                )
            )
    finally:
        server.stop(None)
    return results


def _last_page(
    call: Callable[[pb.ListTaskNodesRequest], pb.ListTaskNodesResponse],
    first: pb.ListTaskNodesRequest,
) -> pb.ListTaskNodesRequest:
    """The request of the listing's last page of PAGE nodes, found by walking it in big
    pages and then in PAGE-node ones (the page size may change between pages)."""
    walker = pb.ListTaskNodesRequest()
    walker.CopyFrom(first)
    walker.page_size = 1000
    total = call(first).total_size
    seen = 0
    while total - seen > 1000 + PAGE:
        reply = call(walker)
        seen += len(reply.nodes)
        walker.page_token = reply.next_page_token
    walker.page_size = PAGE
    while total - seen > PAGE:
        reply = call(walker)
        seen += len(reply.nodes)
        walker.page_token = reply.next_page_token
    final = call(walker)
    assert final.nodes and not final.next_page_token, "not the last page"
    return walker


def print_rows(rows: list[tuple[str, float, float, int]], total: int, url: str = "") -> None:
    store = url.split(":", 1)[0] if url else "sqlite"
    print(f"ListTaskNodes, a task of {total:,} nodes on {store}, pages of {PAGE} (in process)")
    print("| listing | total_size | first page ms | last page ms | last / first |")
    print("|---|---|---|---|---|")
    for name, first, last, size in rows:
        print(f"| {name} | {size:,} | {first:.2f} | {last:.2f} | {last / first:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument(
        "--database-url",
        default="",
        help="an empty database to fill (default: a fresh SQLite file)",
    )
    args = parser.parse_args()
    print_rows(measure(args.nodes, args.calls, args.database_url), args.nodes, args.database_url)


if __name__ == "__main__":
    main()

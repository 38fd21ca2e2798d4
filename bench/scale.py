"""GetTaskNodeDetail latency at 10^3 and at 10^6 nodes, on SQLite and on PostgreSQL.

    make bench-scale
    .venv/bin/python bench/scale.py --stores sqlite postgresql --sizes 1000 1000000

For each store and size it makes a dataset of that many nodes with
server.db.scale (once: a later run reuses it; --fresh makes it again), starts the
real server on it (`python -m server serve`, a process per size, reply cache off),
and times sequential calls from a Python stub for random existing nodes (with
their component code, so every query runs), the sizes taking turns in rounds. It
prints the median, p90 and p99 per size, and per store the ratio of the largest
size's median to the smallest's: indexed lookups should barely notice the data
growing a thousandfold (the target is at most 1.2x).

Datasets live in var/scale/ (SQLite) and in schemas bench_scale_<size> of the
PostgreSQL database named by --postgresql; nothing else is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from peewee import Database
from peewee import fn

from server.db import scale
from server.db.apps import AppStore
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.models import Node
from server.db.models import Project
from server.db.models import Task

APP = {"bk_app_code": "bench", "bk_app_secret": "bench-secret", "bk_username": "bench"}
METADATA = (("x-bkapi-authorization", json.dumps(APP)),)
#: Calls to each server before measuring, and calls to one server before the next's turn.
WARM_UP = 300
ROUND = 50
#: A dataset is reused when it has at least its size in nodes and at most one task more.
SLACK = 200


@dataclass(frozen=True)
class Result:
    store: str
    size: int
    nodes: int
    latencies: list[float]

    def quantile(self, share: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    @property
    def median(self) -> float:
        return statistics.median(self.latencies)


def dataset_url(store: str, size: int, postgresql: str) -> str:
    if store == "sqlite":
        return f"sqlite:///var/scale/scale-{size}.db"
    if store == "postgresql":
        return f"{postgresql}?options={quote(f'-csearch_path=bench_scale_{size}')}"
    raise SystemExit(f"unknown store {store!r}: sqlite or postgresql")


def prepare(store: str, size: int, postgresql: str, fresh: bool) -> tuple[str, int]:
    """The URL of a database holding the dataset of size nodes, and its node count."""
    url = dataset_url(store, size, postgresql)
    if store == "postgresql":
        admin = open_database(postgresql)
        with admin.connection_context():
            if fresh:
                admin.execute_sql(f"DROP SCHEMA IF EXISTS bench_scale_{size} CASCADE")
            admin.execute_sql(f"CREATE SCHEMA IF NOT EXISTS bench_scale_{size}")
        _close(admin)
    elif fresh:
        for suffix in ("", "-wal", "-shm"):
            Path(f"var/scale/scale-{size}.db{suffix}").unlink(missing_ok=True)
    db = open_database(url)
    ensure_schema(db)
    with db.connection_context():
        found = int(Node.select(fn.COUNT(Node.id)).scalar() or 0)
    if size <= found < size + SLACK:
        print(f"{store}: reusing the dataset of {found:,} nodes", file=sys.stderr)
    elif found:
        raise SystemExit(f"{url} holds {found:,} nodes, not ~{size:,}: run with --fresh")
    else:
        print(f"{store}: making a dataset of {size:,} nodes", file=sys.stderr)
        scale.seed(db, tasks=None, nodes=size)
        with db.connection_context():
            found = int(Node.select(fn.COUNT(Node.id)).scalar() or 0)
    with db.connection_context():
        apps = AppStore(db)
        if apps.app(APP["bk_app_code"]) is None:
            apps.add(
                APP["bk_app_code"], APP["bk_app_secret"], all_businesses=True, may_assert_user=True
            )
    _close(db)
    return url, found


def _close(db: Database) -> None:
    """Close a pool's connections (a SQLite database has none open here)."""
    close_all = getattr(db, "close_all", None)
    if close_all is not None:
        close_all()


def sample(url: str, count: int, rng: random.Random) -> list[pb.GetTaskNodeDetailRequest]:
    """Requests for up to count random existing nodes (fewer if ids have gaps)."""
    db = open_database(url)
    with db.connection_context():
        low, high = Node.select(fn.MIN(Node.id), fn.MAX(Node.id)).tuples().first() or (0, 0)
        ids = sorted({rng.randint(low, high) for _ in range(count)})
        rows = (
            Node.select(Project.bk_biz_id, Node.task, Node.node_id, Node.path, Node.component_code)
            .join(Task)
            .join(Project)
            .where(Node.id.in_(ids))
            .tuples()
        )
        requests = [_request(*row) for row in rows.iterator()]
    _close(db)
    rng.shuffle(requests)
    return requests


def _request(
    biz: int, task: int, node_id: str, path: str, code: str
) -> pb.GetTaskNodeDetailRequest:
    """The request for a node, with its component code: all three queries run."""
    return pb.GetTaskNodeDetailRequest(
        bk_biz_id=str(biz),
        task_id=str(task),
        node_id=node_id,
        subprocess_stack=json.loads(path),
        component_code=code,
    )


class ServerProcess:
    """`python -m server serve` on a dataset, in a process of its own."""

    def __init__(
        self, url: str, cache_mb: int, log: Path, extra: dict[str, str] | None = None
    ) -> None:
        self.port = _free_port()
        env = {
            **os.environ,
            **(extra or {}),
            "TASKNODE_DATABASE_URL": url,
            "TASKNODE_GRPC_ADDR": f"127.0.0.1:{self.port}",
            "TASKNODE_HTTP_ADDR": "",
            "TASKNODE_REPLY_CACHE_MB": str(cache_mb),
            "TASKNODE_AUTH_CACHE_SECONDS": "3600",
        }
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve"], env=env, stderr=self._log
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.TaskNodeServiceStub(self.channel)
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)
                break
            except grpc.RpcError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"the server did not start; see {log}") from None

    def call(
        self, request: pb.GetTaskNodeDetailRequest, auth: dict[str, str] | None = None
    ) -> float:
        """Seconds one call took (as the bench app, or with the credentials auth)."""
        metadata = METADATA if auth is None else tuple(auth.items())
        started = time.perf_counter()
        self.stub.GetTaskNodeDetail(request, metadata=metadata, timeout=10)
        return time.perf_counter() - started

    def stop(self) -> None:
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def measure(
    store: str, datasets: list[tuple[int, str, int]], calls: int, cache_mb: int
) -> list[Result]:
    """Sequential calls to one server per dataset, in alternating rounds.

    Running the sizes side by side, a round of each in turn, shares whatever else the
    machine does between them (other processes, the database's checkpoints) instead
    of charging it to whichever size happened to run at the time.
    """
    servers = [
        ServerProcess(url, cache_mb, Path(f"var/scale/{store}-{size}.log"))
        for size, url, _ in datasets
    ]
    try:
        plans = [sample(url, calls, random.Random(size)) for size, url, _ in datasets]
        for server, requests in zip(servers, plans, strict=True):
            for request in requests[:WARM_UP]:
                server.call(request)
        latencies: list[list[float]] = [[] for _ in datasets]
        for start in range(0, calls, ROUND):
            for server, requests, seen in zip(servers, plans, latencies, strict=True):
                for i in range(start, min(start + ROUND, calls)):
                    seen.append(server.call(requests[i % len(requests)]))
    finally:
        for server in servers:
            server.stop()
    return [
        Result(store, size, nodes, seen)
        for (size, _, nodes), seen in zip(datasets, latencies, strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__)
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1_000, 1_000_000])
    parser.add_argument("--calls", type=int, default=3000, help="measured calls per size")
    parser.add_argument("--postgresql", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--fresh", action="store_true", help="make the datasets again")
    parser.add_argument(
        "--reply-cache-mb",
        type=int,
        default=0,
        help="the server's reply cache; off by default, or it would serve every node of "
        "the small dataset from memory and few of the large one (%(default)s)",
    )
    args = parser.parse_args(argv)
    Path("var/scale").mkdir(parents=True, exist_ok=True)

    results: list[Result] = []
    for store in args.stores:
        datasets = [
            (size, *prepare(store, size, args.postgresql, args.fresh)) for size in args.sizes
        ]
        results += measure(store, datasets, args.calls, args.reply_cache_mb)

    print(f"\n{'store':<11}{'nodes':>11}{'calls':>7}{'median':>10}{'p90':>10}{'p99':>10}")
    for r in results:
        print(
            f"{r.store:<11}{r.nodes:>11,}{len(r.latencies):>7}{r.median * 1000:>8.3f}ms"
            f"{r.quantile(0.9) * 1000:>8.3f}ms{r.quantile(0.99) * 1000:>8.3f}ms"
        )
    for store in args.stores:
        mine = [r for r in results if r.store == store]
        small, large = min(mine, key=lambda r: r.size), max(mine, key=lambda r: r.size)
        if small is not large:
            ratio = large.median / small.median
            print(
                f"{store}: median at {large.nodes:,} nodes / at {small.nodes:,} nodes = "
                f"{ratio:.2f}x (target <= 1.2x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

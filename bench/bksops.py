"""The bk-sops store on MariaDB: GetTaskNodeDetail against the ceiling, and at 10^3 vs 10^6 nodes.

    .venv/bin/python -m bench.run --only bksops [--seconds 10]

Datasets (server.db.bksops_scale, in tables the real engine's migrations made) live in
MariaDB databases bench_bksops_<tasks> of MYSQL (root@127.0.0.1:3306, no password): 100
tasks (~10^3 nodes) and 100,000 (~10^6 nodes). Each is made once (the large one takes ~10
minutes on a loaded 2-core machine) and reused while it holds that many tasks. The service's
own database (apps, schemas) is var/bench/bksops-own.db.

1. h2load at 16 in flight: the real server (`python -m server serve`, its reply cache on, as
   `make bench` runs it) reading the large dataset, against the ceiling server answering the
   same reply; the best of REPEATS interleaved runs of each; with each driver, and with the
   cache off (every call reads the engine's rows; the task's tree parsed once and kept).
   PyMySQL and mysqlclient (`driver=mysqlclient`) take turns. One row asks the same node
   in every call (h2load sends one body), as `make bench` asks the native store, and calls
   asking at once share one stamp statement (server.db.coalescing); the spread row has
   SPREAD callers each asking its own node (an h2load each, one call in flight), against
   the ceiling driven the same way, so statements are shared only between different keys.
2. Sequential calls from a Python stub for random nodes that ran, cache off, on a server per
   dataset, the sizes taking turns (bench.scale.measure): median, p90, p99 per size, and the
   large one's median over the small one's (target <= 1.2x). Each node is called once
   first, as a poller calls it again: its task's tree is then kept (the store's tree cache),
   and the figures are of calls that read the engine's rows only; the median of those first
   calls (each a tree decompressed and parsed, and rows perhaps not in MariaDB's buffer pool)
   is printed beside them.
Step 2 and the dataset's writing use mysqlclient.

MariaDB's InnoDB buffer pool (128 MiB on the shared development server) is raised to
BUFFER_POOL for the run when smaller (`SET GLOBAL innodb_buffer_pool_size`, dynamic on
MariaDB 10.11), and left so: the engine's tables of the large dataset are ~1.1 GiB, and a
deployment serving them sizes its pool to them. It is never lowered.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
from bksops.tasknode.v1 import task_node_pb2 as pb

from bench import h2
from bench import procs
from bench import scale
from server.cli import DEMO_APP
from server.db import bksops_scale
from server.db.apps import AppStore
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.connection import open_read_only
from server.db.loader import FORMAT
from server.db.loader import load_document
from tests.engine.harness import engine_schema

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "bench"
#: The MariaDB server the datasets live on (the shared development one).
MYSQL = "mysql://root@127.0.0.1:3306"
SMALL, LARGE = 100, 100_000
GRPC_ADDR = "127.0.0.1:50161"
CEILING_ADDR = "127.0.0.1:50162"
METHOD = "/bksops.tasknode.v1.TaskNodeService/GetTaskNodeDetail"
AUTH = {"x-bkapi-authorization": json.dumps(DEMO_APP)}
LOAD = h2.Load(16, 1)
REPEATS = 2
#: The spread row's callers, each asking its own node, one call in flight each.
SPREAD = 16
SPREAD_ROW = f"mysqlclient, reply cache on, {SPREAD} callers asking {SPREAD} nodes"
SPREAD_CEILING = f"ceiling, {SPREAD} callers"
#: Sequential calls per size (each node called once before), for the 10^3 vs 10^6 comparison.
CALLS = 1500
#: The InnoDB buffer pool the run raises MariaDB's to (see the module's docstring).
BUFFER_POOL = 2 * 1024 * 1024 * 1024


@dataclass(frozen=True)
class Figures:
    rows: list[tuple[str, h2.Run]]
    #: Per row: CPU µs per call of the service's processes, and of the MariaDB server (which
    #: others' work on the shared server adds to).
    cpu: dict[str, tuple[float, float]]
    scaled: list[scale.Result]
    #: Per size, the first call of each node (its task's tree parsed then).
    first: list[scale.Result]
    reply_bytes: int
    #: What the run did to MariaDB's buffer pool, to print.
    buffer_pool: str


def dataset(tasks: int) -> str:
    """The URL of a MariaDB database holding the bk-sops dataset of tasks tasks, made if
    missing (or holding another number of tasks)."""
    name = f"bench_bksops_{tasks}"
    url = f"{MYSQL}/{name}"
    db = open_read_only(url)
    found = bksops_scale.tasks_in(db) if _exists(name) else 0
    db.close_all()  # type: ignore[attr-defined]
    if found == tasks:
        print(f"bksops: reusing {name} ({tasks:,} tasks)", file=sys.stderr)
        return url
    if not 0 < found < tasks:  # nothing, or another dataset: made anew
        _admin(f"DROP DATABASE IF EXISTS {name}")
        _admin(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        print(f"bksops: making {name}: the engine's tables, then {tasks:,} tasks", file=sys.stderr)
        engine_schema(url, Path(tempfile.mkdtemp(prefix="bksops-schema-")))
        found = 0
    else:
        print(f"bksops: {name} holds {found:,} tasks: making the rest", file=sys.stderr)
    db = open_read_only(f"{url}?driver=mysqlclient")
    bksops_scale.seed(db, tasks, start=found)
    db.close_all()  # type: ignore[attr-defined]
    return url


def _admin(sql: str) -> list[tuple[Any, ...]]:
    parts = scale_parts()
    conn = pymysql.connect(
        host=parts["host"], port=parts["port"], user=parts["user"], autocommit=True
    )
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return list(cursor.fetchall())
    finally:
        conn.close()


def scale_parts() -> dict[str, Any]:
    from urllib.parse import urlsplit

    parts = urlsplit(MYSQL)
    return {"host": parts.hostname, "port": parts.port or 3306, "user": parts.username or "root"}


def _exists(name: str) -> bool:
    return bool(_admin(f"SHOW DATABASES LIKE '{name}'"))


def own_database() -> str:
    """The service's own database: the demo app (all businesses) and the plugins' schemas."""
    WORK.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{WORK / 'bksops-own.db'}"
    db = open_database(url)
    ensure_schema(db)
    with db.connection_context():
        load_document(
            db,
            {"format": FORMAT, "projects": [], "components": bksops_scale.schemas(), "tasks": []},
        )
        apps = AppStore(db)
        if apps.app(DEMO_APP["bk_app_code"]) is None:
            apps.add(
                DEMO_APP["bk_app_code"],
                DEMO_APP["bk_app_secret"],
                all_businesses=True,
                may_assert_user=True,
            )
    db.close()
    return url


def requests(url: str, count: int, rng: random.Random) -> list[pb.GetTaskNodeDetailRequest]:
    """Requests for count random plugin nodes that ran, with their component code and stack."""
    db = open_read_only(url)
    found: list[pb.GetTaskNodeDetailRequest] = []
    with db.connection_context():
        (high,) = db.execute_sql("SELECT MAX(id) FROM eri_executiondata").fetchone()
        ids = [rng.randint(1, int(high)) for _ in range(count)]
        marks = ", ".join(["%s"] * len(ids))
        rows = db.execute_sql(
            "SELECT d.node_id, s.root_id, s.parent_id, t.id, p.bk_biz_id, sn.data"
            " FROM eri_executiondata d JOIN eri_state s ON s.node_id = d.node_id"
            " JOIN pipeline_pipelineinstance i ON i.instance_id = s.root_id"
            " JOIN taskflow3_taskflowinstance t ON t.pipeline_instance_id = i.id"
            " JOIN core_project p ON p.id = t.project_id"
            " JOIN pipeline_snapshot sn ON sn.id = i.execution_snapshot_id"
            f" WHERE d.id IN ({marks})",
            ids,
        ).fetchall()
        for node_id, root_id, parent_id, task_id, business, data in rows:
            code = _code(json.loads(zlib.decompress(bytes(data))), node_id)
            found.append(
                pb.GetTaskNodeDetailRequest(
                    bk_biz_id=str(business),
                    task_id=str(task_id),
                    node_id=node_id,
                    subprocess_stack=[] if parent_id == root_id else [parent_id],
                    component_code=code,
                )
            )
    db.close_all()  # type: ignore[attr-defined]
    rng.shuffle(found)
    return found


def _code(pipeline: dict[str, Any], node_id: str) -> str:
    for activity in pipeline["activities"].values():
        if activity["id"] == node_id:
            return str(activity["component"]["code"])
        if activity["type"] == "SubProcess":
            code = _code(activity["pipeline"], node_id)
            if code:
                return code
    return ""


def raise_buffer_pool() -> str:
    """MariaDB's InnoDB buffer pool raised to BUFFER_POOL if smaller; what was done."""
    ((was,),) = _admin("SELECT @@GLOBAL.innodb_buffer_pool_size")
    if int(was) >= BUFFER_POOL:
        return f"InnoDB buffer pool {int(was) >> 20} MiB (left as it was)"
    _admin(f"SET GLOBAL innodb_buffer_pool_size = {BUFFER_POOL}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the resize runs in the background
        status = _admin("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_resize_status'")
        said = str(status[0][1]) if status else ""
        if not said or said.startswith("Completed"):
            break
        time.sleep(0.5)
    return (
        f"InnoDB buffer pool raised from {int(was) >> 20} MiB to {BUFFER_POOL >> 20} MiB"
        " for this run (SET GLOBAL innodb_buffer_pool_size; left raised)"
    )


def measure(seconds: float) -> Figures:
    large, small = dataset(LARGE), dataset(SMALL)
    buffer_pool = raise_buffer_pool()
    print(f"bksops: {buffer_pool}", file=sys.stderr)
    own = own_database()
    rng = random.Random(LARGE)
    asked = requests(large, 50, rng)
    # The benchmark request: a plugin node with histories if one was drawn.
    bench_request = asked[0]
    body = h2.grpc_body(bench_request.SerializeToString(), WORK / "bksops-body.bin")
    env = {
        **os.environ,
        "TASKNODE_DATABASE_URL": own,
        "TASKNODE_GRPC_ADDR": GRPC_ADDR,
        "TASKNODE_HTTP_ADDR": "",
    }
    rows: list[tuple[str, h2.Run]] = []
    reply = b""
    fast = f"{large}?driver=mysqlclient"
    # Sixteen callers, each asking its own node (one h2load each): no two calls ask
    # for the same stamp, so coalescing shares statements only between different keys.
    spread = [
        h2.grpc_body(r.SerializeToString(), WORK / f"bksops-body-{i}.bin")
        for i, r in enumerate(asked[:SPREAD])
    ]
    variants = (
        ("PyMySQL, reply cache on", "64", large),
        ("mysqlclient, reply cache on", "64", fast),
        (SPREAD_ROW, "64", fast),
        ("mysqlclient, reply cache off", "0", fast),
    )
    ceiling: subprocess.Popen[bytes] | None = None
    cpu: dict[str, tuple[float, float]] = {}
    mariadb = [
        int(p.parent.name)
        for p in Path("/proc").glob("[0-9]*/comm")
        if p.exists() and p.read_text().strip() in ("mariadbd", "mysqld")
    ]
    try:
        for label, cache_mb, url in variants:
            server = procs.start(
                [sys.executable, "-m", "server", "serve"],
                {**env, "TASKNODE_BKSOPS_DATABASE_URL": url, "TASKNODE_REPLY_CACHE_MB": cache_mb},
                WORK / "bksops-server.log",
                "serving",
            )
            try:
                reply = _reply(bench_request)
                if ceiling is None:  # on the service's own reply
                    (WORK / "bksops-reply.bin").write_bytes(reply)
                    ceiling = procs.start(
                        [
                            *(sys.executable, "-m", "bench.ceiling", "--addr", CEILING_ADDR),
                            *("--reply", str(WORK / "bksops-reply.bin")),
                        ],
                        os.environ.copy(),
                        WORK / "bksops-ceiling.log",
                        "ready",
                    )
                targets = [(label, GRPC_ADDR)]
                if not rows:
                    targets.append(("ceiling", CEILING_ADDR))
                if label == SPREAD_ROW:
                    targets.append((SPREAD_CEILING, CEILING_ADDR))
                runs: dict[str, list[tuple[h2.Run, tuple[float, float]]]] = {}
                pids = {
                    **{name: procs.tree(ceiling.pid) for name in ("ceiling", SPREAD_CEILING)},
                    label: procs.tree(server.pid),
                }
                for _ in range(REPEATS):  # interleaved, the best of each (bench.run.best_runs)
                    for name, addr in targets:
                        target = f"http://{addr}{METHOD}"

                        def drive(seconds: float, target: str = target, name: str = name) -> h2.Run:
                            if name in (SPREAD_ROW, SPREAD_CEILING):
                                return h2.h2load_spread(target, spread, seconds, AUTH)
                            return h2.h2load(target, body, LOAD, seconds, AUTH, warm_up=0)

                        drive(2)
                        before = procs.cpu_seconds(pids[name]), procs.cpu_seconds(mariadb)
                        run = drive(seconds)
                        used = procs.cpu_seconds(pids[name]), procs.cpu_seconds(mariadb)
                        per_call = tuple(
                            (after - was) / max(run.succeeded, 1) * 1e6
                            for was, after in zip(before, used, strict=True)
                        )
                        runs.setdefault(name, []).append((run, (per_call[0], per_call[1])))
                for name, found in runs.items():
                    best, usage = max(found, key=lambda r: r[0].per_second)
                    rows.append((name, best))
                    cpu[name] = usage
            finally:
                procs.stop(server)
    finally:
        if ceiling is not None:
            procs.stop(ceiling)
    scaled, first = _scaled(own, small + "?driver=mysqlclient", fast)
    return Figures(rows, cpu, scaled, first, len(reply), buffer_pool)


def _reply(request: pb.GetTaskNodeDetailRequest) -> bytes:
    import grpc
    from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

    with grpc.insecure_channel(GRPC_ADDR) as channel:
        stub = pb_grpc.TaskNodeServiceStub(channel)
        detail = stub.GetTaskNodeDetail(request, metadata=list(AUTH.items()), timeout=30)
    return bytes(detail.SerializeToString())


def _scaled(own: str, small: str, large: str) -> tuple[list[scale.Result], list[scale.Result]]:
    """Sequential calls at each size, cache off, the sizes taking turns (bench.scale): of
    each node's second call, and of its first (see the module's docstring)."""
    datasets = []
    for tasks, url in ((SMALL, small), (LARGE, large)):
        db = open_read_only(url)
        with db.connection_context():
            (nodes,) = db.execute_sql("SELECT COUNT(*) FROM eri_state").fetchone()
        db.close_all()  # type: ignore[attr-defined]
        datasets.append((tasks, url, int(nodes)))
    servers = [
        scale.ServerProcess(
            own,
            0,
            WORK / f"bksops-scale-{tasks}.log",
            {"TASKNODE_BKSOPS_DATABASE_URL": url},
        )
        for tasks, url, _ in datasets
    ]
    try:
        plans = [requests(url, CALLS, random.Random(tasks)) for tasks, url, _ in datasets]
        first: list[list[float]] = [[] for _ in datasets]
        latencies: list[list[float]] = [[] for _ in datasets]
        for seen_by_size in (first, latencies):
            for start in range(0, CALLS, scale.ROUND):
                for server, asked, seen in zip(servers, plans, seen_by_size, strict=True):
                    for i in range(start, min(start + scale.ROUND, CALLS)):
                        seen.append(server.call(asked[i % len(asked)], AUTH))
    finally:
        for server in servers:
            server.stop()
    sizes = [(tasks, nodes) for tasks, _, nodes in datasets]
    return (
        [scale.Result("mariadb", *size, seen) for size, seen in zip(sizes, latencies, strict=True)],
        [scale.Result("mariadb", *size, seen) for size, seen in zip(sizes, first, strict=True)],
    )


def print_rows(figures: Figures, seconds: float) -> None:
    print(
        f"\nbk-sops store on MariaDB, {LARGE:,} tasks; reply {figures.reply_bytes} bytes; "
        f"h2load {LOAD.in_flight} in flight, best of {REPEATS} runs of {seconds:g} s\n"
    )
    print("| server | calls/s | p50 ms | p99 ms | p99/p50 | CPU µs/call | MariaDB CPU µs/call |")
    print("|---|---|---|---|---|---|---|")
    for name, run in figures.rows:
        own, db = figures.cpu[name]
        print(
            f"| {name} | {run.per_second:,.0f} | {run.p50_ms:.2f} | {run.p99_ms:.2f} | "
            f"{run.p99_ms / max(run.p50_ms, 1e-9):.1f} | {own:.0f} | {db:.0f} |"
        )
    found = dict(figures.rows)
    for name, run in figures.rows:
        if "ceiling" not in name:
            against = SPREAD_CEILING if name == SPREAD_ROW else "ceiling"
            ratio = run.per_second / found[against].per_second
            print(f"{name} / {against}: {ratio:.2f} (target >= 0.45)")
    print(f"\n{figures.buffer_pool}")
    print(
        f"\nsequential calls, random nodes that ran, cache off ({CALLS} per size), each node's"
        " second call (its first in brackets: the task's tree parsed):"
    )
    for r, first in zip(figures.scaled, figures.first, strict=True):
        print(
            f"  {r.nodes:>9,} nodes ({r.size:,} tasks): median {r.median * 1000:.2f} ms, "
            f"p90 {r.quantile(0.9) * 1000:.2f} ms, p99 {r.quantile(0.99) * 1000:.2f} ms "
            f"(first: median {first.median * 1000:.2f} ms, p99 {first.quantile(0.99) * 1000:.2f})"
        )
    small, large = figures.scaled
    print(
        f"  median at {large.nodes:,} / at {small.nodes:,} nodes: "
        f"{large.median / small.median:.2f}x (target <= 1.2x)"
    )


def main(seconds: float) -> int:
    started = time.monotonic()
    print_rows(measure(seconds), seconds)
    print(f"(bksops step: {time.monotonic() - started:.0f} s)")
    return 0

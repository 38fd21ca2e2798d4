"""The watch step of make bench: 10, 1,000 and 10,000 open WatchTaskNode streams on one server.

For each count, one server process (`serve`, TASKNODE_GRPC_PROCESSES=1) and one caller
process (bench.watch_clients) holding that many streams on one node; while they are
open, a writer re-imports the node's task CHANGES times, one change every
CHANGE_SECONDS. Printed per count: store queries per second while the streams are
open (the server's own tasknode_store_query_duration_seconds count, all queries),
the server's resident memory (RSS) with the streams open, and per stream (that RSS
less the RSS before any was opened, over the count: at 10 streams mostly the fixed
cost of the first), and change-to-delivery latency: from the writer's
commit to each stream's receipt of the changed detail, p50 and p99 over every stream
and change (p99 should stay within TASKNODE_WATCH_INTERVAL + 50 ms); how many of the
CHANGES x streams details were delivered (level-triggered: a stream behind may get
a later one instead), how many streams got the last change, and how many seconds
after its write the last of them did.

    .venv/bin/python -m bench.run --only watch
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import procs
from bench.watch_clients import NODE
from bench.watch_clients import TASK
from server.cli import load_demo_if_empty
from server.config import Config
from server.db.connection import open_database
from server.db.loader import FORMAT
from server.db.loader import load_document

COUNTS = (10, 1_000, 10_000)
CHANGES = 8
CHANGE_SECONDS = 1.0
INTERVAL = 0.25
#: The longest the caller process is given to receive the last change on every stream.
CONVERGE_SECONDS = 60.0
GRPC_ADDR = "127.0.0.1:50161"
WATCH_ADDR = "127.0.0.1:50162"
METRICS_ADDR = "127.0.0.1:50163"


@dataclass(frozen=True)
class WatchRow:
    streams: int
    queries_per_second: float
    kib_per_stream: float
    rss_mib: float
    p50_ms: float
    p99_ms: float
    delivered: int
    expected: int
    #: Streams that received the last change (level-triggered: every one should), and
    #: how long after its write the last of them did (NaN: not within CONVERGE_SECONDS).
    converged: int
    converge_seconds: float
    errors: dict[str, int]


def document(version: int) -> dict[str, Any]:
    """Task TASK of business 2 (the demo data's) with the watched node at version."""
    return {
        "format": FORMAT,
        "projects": [],
        "components": [],
        "tasks": [
            {
                "id": TASK,
                "project_id": 1,  # the demo's project of business 2
                "name": "watch bench",
                "nodes": [
                    {
                        "id": NODE,
                        "name": "watched",
                        "type": "ServiceActivity",
                        "inputs": {"round": version},
                        "outputs": {},
                        "execution": {
                            "state": "RUNNING",
                            "version": f"v{version}",
                            "start_time": "2024-05-01T10:00:00+08:00",
                        },
                    }
                ],
            }
        ],
    }


def _line(process: subprocess.Popen[str], expected: str, seconds: float) -> bool:
    """Whether process prints the line expected within seconds."""
    assert process.stdout is not None
    found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip() == expected:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    return found.wait(seconds)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _queries() -> float:
    text = httpx.get(f"http://{METRICS_ADDR}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "tasknode_store_query_duration_seconds"
        for sample in family.samples
        if sample.name.endswith("_count")
    )


def measure_one(count: int, work: Path) -> WatchRow:
    url = f"sqlite:///{work / 'watch.db'}"
    load_demo_if_empty(Config(database_url=url))
    db = open_database(url)
    with db.connection_context():
        load_document(db, document(0))
    db.close()
    env = {
        **os.environ,
        "TASKNODE_DATABASE_URL": url,
        "TASKNODE_GRPC_ADDR": GRPC_ADDR,
        "TASKNODE_WATCH_ADDR": WATCH_ADDR,
        "TASKNODE_METRICS_ADDR": METRICS_ADDR,
        "TASKNODE_HTTP_ADDR": "",
        "TASKNODE_GRPC_PROCESSES": "1",
        "TASKNODE_WATCH_INTERVAL": str(INTERVAL),
        "TASKNODE_WATCH_MAX_STREAMS": str(max(COUNTS)),
        "TASKNODE_AUTH_CACHE_SECONDS": "3600",
    }
    server = procs.start(
        [sys.executable, "-m", "server", "serve"], env, work / "watch-server.log", "serving"
    )
    out = work / f"watch-{count}.json"
    try:
        time.sleep(1)
        before_kib = _rss_kib(server.pid)
        clients = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.watch_clients", WATCH_ADDR, str(count)),
                *(f"v{CHANGES}", str(out)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert clients.stdout is not None
        if clients.stdout.readline().strip() != "ready":
            raise RuntimeError("the watch clients did not open their streams")
        time.sleep(1)
        open_kib = _rss_kib(server.pid)
        queries, started = _queries(), time.monotonic()
        written: dict[str, float] = {}
        db = open_database(url)
        for version in range(1, CHANGES + 1):
            time.sleep(CHANGE_SECONDS)
            with db.connection_context():
                load_document(db, document(version))
            written[f"v{version}"] = time.time()
        time.sleep(CHANGE_SECONDS)
        per_second = (_queries() - queries) / (time.monotonic() - started)
        db.close()
        last_write = time.monotonic()
        converged = _line(clients, "converged", CONVERGE_SECONDS)
        converge_seconds = time.monotonic() - last_write + CHANGE_SECONDS
        clients.send_signal(signal.SIGTERM)
        clients.wait(120)
    finally:
        procs.stop(server)
    result = json.loads(out.read_text())
    latencies = [
        (received - written[version]) * 1000
        for version, times in result["receipts"].items()
        if version in written
        for received in times
    ]
    latencies.sort()
    return WatchRow(
        streams=count,
        queries_per_second=per_second,
        kib_per_stream=(open_kib - before_kib) / count,
        rss_mib=open_kib / 1024,
        p50_ms=statistics.median(latencies) if latencies else float("nan"),
        p99_ms=latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
        delivered=len(latencies),
        expected=count * CHANGES,
        converged=len(result["receipts"].get(f"v{CHANGES}", ())),
        converge_seconds=converge_seconds if converged else float("nan"),
        errors=result["errors"],
    )


def measure(work: Path) -> list[WatchRow]:
    work.mkdir(parents=True, exist_ok=True)
    return [measure_one(count, work) for count in COUNTS]


def print_rows(rows: list[WatchRow]) -> None:
    print(
        f"watch streams on one server process, one node changed {CHANGES} times "
        f"(TASKNODE_WATCH_INTERVAL {INTERVAL:g} s; target p99 <= {INTERVAL * 1000 + 50:.0f} ms)"
    )
    print(
        f"{'streams':>8} {'store queries/s':>16} {'RSS MiB':>8} {'KiB/stream':>11}"
        f" {'p50 ms':>8} {'p99 ms':>8} {'delivered':>14} {'got last':>8} {'after s':>7}"
        "  errors"
    )
    for row in rows:
        print(
            f"{row.streams:>8,} {row.queries_per_second:>16.1f} {row.rss_mib:>8.0f}"
            f" {row.kib_per_stream:>11.1f} {row.p50_ms:>8.1f} {row.p99_ms:>8.1f}"
            f" {row.delivered:>7,}/{row.expected:<7,} {row.converged:>8,}"
            f" {row.converge_seconds:>7.1f}"
            f"  {row.errors or '-'}"
        )

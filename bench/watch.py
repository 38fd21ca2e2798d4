"""The watch step of make bench: 10, 1,000 and 10,000 open WatchTaskNode streams on one server.

Two workloads, each with one server process (`serve`, TASKNODE_GRPC_PROCESSES=1) and one
caller process (bench.watch_clients) holding the streams, while a writer re-imports
tasks, one round every CHANGE_SECONDS for CHANGES rounds:

- spread: every ten streams watch a node of their own, ten watched nodes a task (so 10,000
  streams watch 1,000 nodes of 100 tasks), and each round changes one watched node in
  each of up to ten tasks: the many-deploy-tools, many-dashboards case, where detection
  is shared by every stream and a change goes to the few streams that watch its node;
- one node: every stream watches the same node, which each round changes: the worst
  case, where each change is a message to every stream, so delivery is bounded by what
  writing a message costs (the µs/msg columns), not by detection.

Printed per count: store queries per second while the streams are open (the server's
own tasknode_store_query_duration_seconds count, all queries), the server's resident
memory (RSS) with the streams open, and per stream (that RSS less the RSS before any
was opened, over the count: at 10 streams mostly the fixed cost of the first), and
change-to-delivery latency: from the writer's commit to each stream's receipt of the
changed detail, p50 and p99 over every stream and change (p99 should stay within
TASKNODE_WATCH_INTERVAL + 50 ms); how many details were delivered of those the changes
owed (level-triggered: a stream behind may get a later one instead), how many streams
got the last round's change, and how many seconds after its write the last of them did;
and the CPU the server and the caller process spent over the rounds, per detail
delivered.

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
from bench.watch_clients import NODES_PER_TASK
from bench.watch_clients import TASK
from server.cli import load_demo_if_empty
from server.config import Config
from server.db.connection import open_database
from server.db.loader import FORMAT
from server.db.loader import load_document

COUNTS = (10, 1_000, 10_000)
#: The one-node workload's counts (at 10 streams it is the spread one).
HOT_COUNTS = (1_000, 10_000)
#: Streams a node in the spread workload.
SPREAD = 10
#: Most tasks a round of the spread workload changes (one watched node each).
TASKS_A_ROUND = 10
CHANGES = 8
CHANGE_SECONDS = 1.0
INTERVAL = 0.25
#: The longest the caller process is given to receive the last round on every stream.
CONVERGE_SECONDS = 60.0
GRPC_ADDR = "127.0.0.1:50161"
WATCH_ADDR = "127.0.0.1:50162"
METRICS_ADDR = "127.0.0.1:50163"


@dataclass(frozen=True)
class WatchRow:
    workload: str
    streams: int
    queries_per_second: float
    kib_per_stream: float
    rss_mib: float
    p50_ms: float
    p99_ms: float
    delivered: int
    expected: int
    #: Streams that received the last round's change (level-triggered: every one should),
    #: and how long after its write the last of them did (NaN: not within CONVERGE_SECONDS).
    converged: int
    converge_seconds: float
    errors: dict[str, int]
    #: CPU over the rounds (server, caller process), a detail delivered, in µs.
    server_us: float
    client_us: float


@dataclass(frozen=True)
class Layout:
    """Which node each stream watches (bench.watch_clients.watched) and what each round
    changes: (task index, node index) pairs."""

    streams: int
    per_node: int

    @property
    def nodes(self) -> int:
        return -(-self.streams // self.per_node)

    @property
    def tasks(self) -> int:
        return -(-self.nodes // NODES_PER_TASK)

    def watchers(self, task: int, node: int) -> int:
        first = (task * NODES_PER_TASK + node) * self.per_node
        return max(0, min(self.streams, first + self.per_node) - first)

    def changed(self, round_: int) -> list[tuple[int, int]]:
        """Round round_'s changes (1-based): one watched node in each of up to
        TASKS_A_ROUND tasks, taking the tasks and each task's nodes in turn."""
        count = min(self.tasks, TASKS_A_ROUND)
        out = []
        for slot in range(count):
            task = ((round_ - 1) * count + slot) % self.tasks
            nodes = min(NODES_PER_TASK, self.nodes - task * NODES_PER_TASK)
            out.append((task, ((round_ - 1) // max(1, self.tasks // count)) % nodes))
        return out


def version(round_: int, task: int) -> str:
    """The version a round gives the node it changes in task: unique, so each receipt
    names its write."""
    return f"r{round_}t{task}"


def document(task: int, versions: dict[int, str]) -> dict[str, Any]:
    """Task TASK + task of business 2 (the demo data's), its nodes at versions."""
    return {
        "format": FORMAT,
        "projects": [],
        "components": [],
        "tasks": [
            {
                "id": TASK + task,
                "project_id": 1,  # the demo's project of business 2
                "name": "watch bench",
                "nodes": [
                    {
                        "id": f"n{node}",
                        "name": f"watched {node}",
                        "type": "ServiceActivity",
                        "inputs": {"round": versions.get(node, "r0")},
                        "outputs": {},
                        "execution": {
                            "state": "RUNNING",
                            "version": versions.get(node, "r0"),
                            "start_time": "2024-05-01T10:00:00+08:00",
                        },
                    }
                    for node in range(NODES_PER_TASK)
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


def measure_one(layout: Layout, workload: str, work: Path) -> WatchRow:
    url = f"sqlite:///{work / f'watch-{workload}-{layout.streams}.db'}"
    load_demo_if_empty(Config(database_url=url))
    versions: list[dict[int, str]] = [{} for _ in range(layout.tasks)]
    db = open_database(url)
    with db.connection_context():
        for task in range(layout.tasks):
            load_document(db, document(task, versions[task]))
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
    out = work / f"watch-{workload}-{layout.streams}.json"
    last = layout.changed(CHANGES)
    expected_last = sum(layout.watchers(task, node) for task, node in last)
    try:
        time.sleep(1)
        before_kib = _rss_kib(server.pid)
        clients = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.watch_clients", WATCH_ADDR),
                *(str(layout.streams), str(layout.per_node)),
                *(f"r{CHANGES}t", str(expected_last), str(out)),
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
        cpu = procs.cpu_seconds([server.pid]), procs.cpu_seconds([clients.pid])
        written: dict[str, float] = {}
        expected = 0
        db = open_database(url)
        for round_ in range(1, CHANGES + 1):
            time.sleep(CHANGE_SECONDS)
            for task, node in layout.changed(round_):
                versions[task][node] = version(round_, task)
                with db.connection_context():
                    load_document(db, document(task, versions[task]))
                written[version(round_, task)] = time.time()
                expected += layout.watchers(task, node)
        time.sleep(CHANGE_SECONDS)
        per_second = (_queries() - queries) / (time.monotonic() - started)
        server_cpu = procs.cpu_seconds([server.pid]) - cpu[0]
        client_cpu = procs.cpu_seconds([clients.pid]) - cpu[1]
        db.close()
        last_write = time.monotonic()
        converged = _line(clients, "converged", CONVERGE_SECONDS)
        converge_seconds = time.monotonic() - last_write + CHANGE_SECONDS
        clients.send_signal(signal.SIGTERM)
        clients.wait(120)
    finally:
        procs.stop(server)
    result = json.loads(out.read_text())
    latencies = sorted(
        (received - written[version_]) * 1000
        for version_, times in result["receipts"].items()
        if version_ in written
        for received in times
    )
    delivered = max(len(latencies), 1)
    return WatchRow(
        workload=workload,
        streams=layout.streams,
        queries_per_second=per_second,
        kib_per_stream=(open_kib - before_kib) / layout.streams,
        rss_mib=open_kib / 1024,
        p50_ms=statistics.median(latencies) if latencies else float("nan"),
        p99_ms=latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
        delivered=len(latencies),
        expected=expected,
        converged=sum(
            len(times)
            for version_, times in result["receipts"].items()
            if version_.startswith(f"r{CHANGES}t")
        ),
        converge_seconds=converge_seconds if converged else float("nan"),
        errors=result["errors"],
        server_us=server_cpu / delivered * 1e6,
        client_us=client_cpu / delivered * 1e6,
    )


def measure(work: Path) -> list[WatchRow]:
    work.mkdir(parents=True, exist_ok=True)
    spread = [measure_one(Layout(count, SPREAD), "spread", work) for count in COUNTS]
    hot = [measure_one(Layout(count, count), "one node", work) for count in HOT_COUNTS]
    return spread + hot


def print_rows(rows: list[WatchRow]) -> None:
    print(
        f"watch streams on one server process, {CHANGES} rounds of changes a second apart"
        f" (TASKNODE_WATCH_INTERVAL {INTERVAL:g} s; target p99 <= {INTERVAL * 1000 + 50:.0f} ms);"
        f" spread: {SPREAD} streams a node, a round changes a watched node in up to"
        f" {TASKS_A_ROUND} tasks; one node: every stream on the node each round changes"
    )
    print(
        f"{'workload':>9} {'streams':>7} {'queries/s':>9} {'RSS MiB':>7} {'KiB/stream':>10}"
        f" {'p50 ms':>7} {'p99 ms':>7} {'delivered':>13} {'got last':>8} {'after s':>7}"
        f" {'µs/msg srv':>10} {'µs/msg cli':>10}  errors"
    )
    for row in rows:
        print(
            f"{row.workload:>9} {row.streams:>7,} {row.queries_per_second:>9.1f}"
            f" {row.rss_mib:>7.0f} {row.kib_per_stream:>10.1f} {row.p50_ms:>7.1f}"
            f" {row.p99_ms:>7.1f} {row.delivered:>6,}/{row.expected:<6,} {row.converged:>8,}"
            f" {row.converge_seconds:>7.1f} {row.server_us:>10.0f} {row.client_us:>10.0f}"
            f"  {row.errors or '-'}"
        )

"""A large, deterministic bk-sops database: tasks as bk-sops and its engine leave them.

    python -m server.db.bksops_scale --tasks 100000 --database-url mysql://root@127.0.0.1/x

It fills a database that already has the engine's tables and bk-sops's two (an empty one
prepared by `tests.engine.harness.engine_schema`, which runs the real engine's migrations)
with what server.db.bksops reads: projects of BUSINESSES businesses, and per task a
`taskflow3_taskflowinstance` row, its `pipeline_pipelineinstance`, its execution snapshot
(`pipeline_snapshot.data`: the web tree as bk-sops keeps it, zlib-compressed JSON, with the
layout keys a real tree carries), and for the nodes that ran their `eri_state`,
`eri_executiondata` and `eri_executionhistory` rows. A task has ~10 nodes: start and end
events, 5-9 plugin nodes, and in two tasks of five a sub-process of 2-4 plugin nodes; 70 %
run to their end, 15 % stop at a failed node, 10 % at a running one, 5 % never start. One
plugin node in twelve that ran was retried or looped, leaving history rows. 10^5 tasks are
~10^6 nodes. Node ids are "node" + 28 hex digits, pipeline ids 32, versions "v" + 32, times
UTC, as the engine writes them. The same seed gives the same rows.

The plugins are server.db.scale's COMPONENTS; their output schemas belong in the service's
own database (`schemas()` gives them in the import format).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import queue
import random
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from urllib.parse import unquote
from urllib.parse import urlsplit

from peewee import Database
from peewee import DatabaseError
from peewee import MySQLDatabase
from peewee import PostgresqlDatabase
from peewee import SqliteDatabase

from server.db.connection import open_read_only
from server.db.scale import COMPONENTS
from server.db.scale import ERRORS
from server.db.scale import THINGS
from server.db.scale import VERBS
from server.db.scale import StopsOnce
from server.db.scale import settle

SEED = 20190117
BUSINESSES = 20
FIRST_BUSINESS = 100
#: Rows per INSERT statement, and rows per transaction.
BATCH = 500
COMMIT_EVERY = 20_000
#: 2024-01-01T00:00:00Z: the first task's start.
EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)

Row = tuple[Any, ...]

#: The columns this generator writes, per table, in its rows' order.
COLUMNS: dict[str, tuple[str, ...]] = {
    "core_project": (
        "id", "name", "time_zone", "creator", "desc", "create_at", "from_cmdb", "bk_biz_id",
        "is_disable", "tenant_id",
    ),
    "pipeline_snapshot": ("id", "md5sum", "create_time", "data"),
    "pipeline_pipelineinstance": (
        "id", "instance_id", "name", "creator", "create_time", "executor", "start_time",
        "finish_time", "description", "is_started", "is_finished", "is_deleted",
        "execution_snapshot_id", "is_revoked", "is_expired",
    ),
    "taskflow3_taskflowinstance": (
        "id", "project_id", "pipeline_instance_id", "category", "template_id", "template_source",
        "create_method", "create_info", "flow_type", "current_flow", "is_deleted", "engine_ver",
        "is_child_taskflow",
    ),
    "eri_state": (
        "node_id", "root_id", "parent_id", "name", "version", "loop", "inner_loop", "retry",
        "skip", "error_ignored", "created_time", "started_time", "archived_time",
    ),
    "eri_executiondata": (
        "node_id", "inputs_serializer", "outputs_serializer", "inputs", "outputs",
    ),
    "eri_executionhistory": (
        "node_id", "loop", "retry", "skip", "version", "started_time", "archived_time",
        "inputs_serializer", "outputs_serializer", "inputs", "outputs",
    ),
}  # fmt: skip
#: Tables in the order rows go in (a task after its instance, an instance after its snapshot).
ORDER = tuple(COLUMNS)


@dataclass
class Rows:
    """Rows made and not yet written, by table."""

    tables: dict[str, list[Row]] = field(default_factory=lambda: {t: [] for t in ORDER})

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.tables.values())


@dataclass(frozen=True)
class Made:
    """A node the generator made, for tests and benchmarks to ask for."""

    business: int
    task_id: int
    node_id: str
    stack: tuple[str, ...]
    code: str
    state: str | None
    loop: int
    histories: int
    children: int


class Generator(StopsOnce):
    """Makes one task's rows after another, from one seeded random source."""

    def __init__(self, seed: int = SEED) -> None:
        self.rng = random.Random(seed)
        self.tasks_made = 0
        self.rows = Rows()
        self.made: list[Made] = []
        #: eri_state rows made per parent pipeline, for the children a sub-process shows.
        self.children_of: dict[str, int] = {}
        #: A few payloads per plugin to draw from, as JSON text.
        self.payloads = {
            code: (
                [json.dumps(self._inputs()) for _ in range(8)],
                [self._outputs(keys) for _ in range(8)],
            )
            for code, _, keys in COMPONENTS
        }

    def projects(self) -> None:
        for b in range(BUSINESSES):
            business = FIRST_BUSINESS + b
            self.rows.tables["core_project"].append(
                (
                    b + 1, f"scale business {business}", "Asia/Shanghai", "admin", "",
                    _naive(EPOCH), True, business, False, "default",
                )
            )  # fmt: skip

    def task(self) -> None:
        """The next task's rows, into self.rows."""
        index = self.tasks_made
        self.tasks_made += 1
        rng = self.rng
        task_id = index + 1
        self.clock = EPOCH + datetime.timedelta(minutes=10 * index)
        started_at = self.clock
        outcome = rng.choices(("finished", "failed", "running", "new"), (70, 15, 10, 5))[0]
        #: Plugin nodes to finish before the task stops (None: all), and how it stops.
        self.finishing: int | None = None if outcome == "finished" else rng.randint(0, 7)
        self.stop = {"failed": "FAILED", "running": "RUNNING"}.get(outcome)
        if outcome == "new":
            self.finishing, self.stop = 0, None
        self.business = FIRST_BUSINESS + index % BUSINESSES
        self.task_id = task_id
        root_id = f"{rng.getrandbits(128):032x}"
        self.root_id = root_id
        pipeline, state = self._pipeline(root_id, (), depth=0)
        if state is not None:
            self._state(root_id, root_id, "", state, started_at, 1, 0)
        tree = json.dumps(pipeline, separators=(",", ":")).encode()
        data = zlib.compress(tree)
        started = outcome != "new"
        finished = state == "FINISHED"
        tables = self.rows.tables
        tables["pipeline_snapshot"].append(
            (
                task_id,
                hashlib.md5(tree, usedforsecurity=False).hexdigest(),
                _naive(started_at),
                data,
            )
        )
        tables["pipeline_pipelineinstance"].append(
            (
                task_id, root_id, f"{rng.choice(VERBS)} {rng.choice(THINGS)} {index}", "admin",
                _naive(started_at), "admin" if started else "",
                _naive(started_at) if started else None,
                _naive(self.clock) if finished else None, "", started, finished, False,
                task_id, False, False,
            )
        )  # fmt: skip
        tables["taskflow3_taskflowinstance"].append(
            (
                task_id, index % BUSINESSES + 1, task_id, "Default", str(index % 50 + 1),
                "project", "app", "", "common", "execute_task", False, 2, False,
            )
        )  # fmt: skip

    def _pipeline(
        self, pipeline_id: str, stack: tuple[str, ...], depth: int
    ) -> tuple[dict[str, Any], str | None]:
        """A (sub-)pipeline's web tree and its state (None: it never started)."""
        rng = self.rng
        kinds = ["ServiceActivity"] * (rng.randint(5, 9) if depth == 0 else rng.randint(2, 4))
        if depth == 0 and rng.random() < 0.4:
            kinds.insert(rng.randint(1, len(kinds) - 1), "SubProcess")
        start_id, end_id = self._id(), self._id()
        ids = [self._id() for _ in kinds]
        chain = [start_id, *ids, end_id]
        flows = {}
        for source, target in itertools.pairwise(chain):
            flow = f"line{rng.getrandbits(112):028x}"
            flows[flow] = {"id": flow, "source": source, "target": target, "is_default": False}
        incoming = {f["target"]: f["id"] for f in flows.values()}
        outgoing = {f["source"]: f["id"] for f in flows.values()}
        activities: dict[str, Any] = {}
        states: list[str | None] = []
        first = len(self.rows.tables["eri_state"])
        for node_id, kind in zip(ids, kinds, strict=True):
            where = {
                "incoming": [incoming[node_id]],
                "outgoing": outgoing[node_id],
                "stage_name": f"Stage {len(activities) + 1}",
                "labels": [],
                "optional": True,
                "isSkipped": True,
                "can_retry": True,
                "retryable": True,
                "skippable": True,
                "loop": None,
            }
            if kind == "SubProcess":
                at = len(self.rows.tables["eri_state"])
                sub, state = self._pipeline(node_id, (*stack, node_id), depth + 1)
                activities[node_id] = {
                    "id": node_id,
                    "type": "SubProcess",
                    "name": f"{rng.choice(VERBS)} {rng.choice(THINGS)} stage",
                    "error_ignorable": False,
                    "constants": {},
                    "pipeline": sub,
                    **where,
                }
                if state is not None:
                    # The engine writes a sub-process's state on entering it, before its
                    # children's: its row goes where it was when it began.
                    self._state(node_id, self.root_id, pipeline_id, state, self.clock, 1, 0)
                    states_made = self.rows.tables["eri_state"]
                    states_made.insert(at, states_made.pop())
                    self._made(node_id, stack, "", state, 1, 0, self.children_of[node_id])
                else:
                    self._made(node_id, stack, "", None, 1, 0, 0)
            else:
                activity, state = self._activity(node_id, pipeline_id, stack, where)
                activities[node_id] = activity
            states.append(state)
        if states[0] is not None:  # the start event ran first
            self._state(start_id, self.root_id, pipeline_id, "FINISHED", self.clock, 1, 0)
            states_made = self.rows.tables["eri_state"]
            states_made.insert(first, states_made.pop())
        self._made(start_id, stack, "", "FINISHED" if states[0] else None, 1, 0, 0)
        ended = all(s == "FINISHED" for s in states)
        if ended:
            self._state(end_id, self.root_id, pipeline_id, "FINISHED", self.clock, 1, 0)
        self._made(end_id, stack, "", "FINISHED" if ended else None, 1, 0, 0)
        final: str | None = "FINISHED" if states and states[-1] == "FINISHED" else None
        for stopped in ("FAILED", "RUNNING"):
            if stopped in states:
                final = "RUNNING"  # a pipeline holding a failed node is still running
        if final is None and states[0] is not None:
            final = "RUNNING"
        tree = {
            "id": pipeline_id,
            "start_event": {
                "id": start_id,
                "type": "EmptyStartEvent",
                "name": None,
                "incoming": "",
                "outgoing": outgoing[start_id],
            },
            "end_event": {
                "id": end_id,
                "type": "EmptyEndEvent",
                "name": None,
                "incoming": [incoming[end_id]],
                "outgoing": "",
            },
            "activities": activities,
            "gateways": {},
            "flows": flows,
            "constants": {},
            "outputs": [],
            "line": [
                {"id": f, "source": {"id": s["source"]}, "target": {"id": s["target"]}}
                for f, s in flows.items()
            ],
            "location": [
                {"id": n, "x": 80 + 160 * i, "y": 140, "type": "tasknode"}
                for i, n in enumerate(chain)
            ],
        }
        return tree, final

    def _activity(
        self, node_id: str, pipeline_id: str, stack: tuple[str, ...], where: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        rng = self.rng
        code, versions, _ = rng.choice(COMPONENTS)
        version = rng.choice(versions)
        inputs, outputs = self.payloads[code]
        given = json.loads(rng.choice(inputs))
        activity = {
            "id": node_id,
            "type": "ServiceActivity",
            "name": f"{rng.choice(VERBS)} {rng.choice(THINGS)}",
            "error_ignorable": rng.random() < 0.05,
            "component": {
                "code": code,
                "version": version,
                "data": {key: {"hook": False, "value": value} for key, value in given.items()},
            },
            **where,
        }
        state = self._next_state()
        if state is None:
            self._made(node_id, stack, code, None, 1, 0, 0)
            return activity, None
        loop, retry, histories = 1, 0, 0
        if rng.random() < 1 / 12:
            loop, retry, histories = self._earlier(node_id, inputs, outputs)
        begun = self.clock
        self.clock += datetime.timedelta(seconds=rng.randint(1, 300))
        self._state(node_id, self.root_id, pipeline_id, state, begun, loop, retry)
        shown = dict(rng.choice(outputs), _loop=loop, _inner_loop=loop)
        if state == "FAILED":
            shown.update(_result=False, ex_data=rng.choice(ERRORS))
        self.rows.tables["eri_executiondata"].append(
            (node_id, "json", "json", json.dumps(given), json.dumps(shown))
        )
        self._made(node_id, stack, code, state, loop, histories, 0)
        return activity, state

    def _earlier(
        self, node_id: str, inputs: list[str], outputs: list[dict[str, Any]]
    ) -> tuple[int, int, int]:
        """History rows of a looped (1 in 4) or retried node; its (loop, retry, histories in
        its current loop)."""
        rng = self.rng
        looped = rng.random() < 0.25
        loop = rng.randint(2, 4) if looped else 1
        retry = 0 if looped else rng.randint(1, 3)
        runs = [(n, 0, True) for n in range(1, loop)] + [(loop, r, False) for r in range(retry)]
        for run_loop, run_retry, passed in runs:
            begun = self.clock
            self.clock += datetime.timedelta(seconds=rng.randint(1, 120))
            shown = dict(rng.choice(outputs), _loop=run_loop, _inner_loop=run_loop)
            if not passed:
                shown.update(_result=False, ex_data=rng.choice(ERRORS))
            self.rows.tables["eri_executionhistory"].append(
                (
                    node_id, run_loop, run_retry, False, self._version(), _naive(begun),
                    _naive(self.clock), "json", "json", rng.choice(inputs), json.dumps(shown),
                )
            )  # fmt: skip
        return loop, retry, retry

    def _state(
        self,
        node_id: str,
        root_id: str,
        parent_id: str,
        state: str,
        begun: datetime.datetime,
        loop: int,
        retry: int,
    ) -> None:
        archived = _naive(self.clock) if state in ("FINISHED", "FAILED") else None
        self.children_of[parent_id] = self.children_of.get(parent_id, 0) + 1
        self.rows.tables["eri_state"].append(
            (
                node_id, root_id, parent_id, state, self._version(), loop, loop, retry, False,
                False, _naive(begun), _naive(begun), archived,
            )
        )  # fmt: skip

    def _made(
        self,
        node_id: str,
        stack: tuple[str, ...],
        code: str,
        state: str | None,
        loop: int,
        histories: int,
        children: int,
    ) -> None:
        self.made.append(
            Made(
                self.business, self.task_id, node_id, stack, code, state, loop, histories, children
            )
        )

    def _id(self) -> str:
        return f"node{self.rng.getrandbits(112):028x}"

    def _version(self) -> str:
        return f"v{self.rng.getrandbits(128):032x}"

    def _inputs(self) -> dict[str, Any]:
        rng = self.rng
        return {
            "biz_cc_id": rng.randint(1, 5000),
            "job_script_source": rng.choice(("manual", "general", "public")),
            "job_content": "#!/bin/bash\n" + "echo step\n" * rng.randint(1, 12),
            "job_ip_list": [f"10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in "xy"],
            "job_timeout": rng.choice((None, 600, 3600)),
        }

    def _outputs(self, keys: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        rng = self.rng
        found: dict[str, Any] = {key: rng.randint(1, 2**40) for key, _ in keys}
        found["_result"] = True
        return found


def schemas() -> list[dict[str, Any]]:
    """The plugins' output schemas, as the import format's `components` writes them."""
    return [
        {"code": code, "version": version, "outputs": [{"key": k, "name": n} for k, n in keys]}
        for code, versions, keys in COMPONENTS
        for version in versions
    ]


def _naive(moment: datetime.datetime) -> datetime.datetime:
    """A UTC time as Django stores it with USE_TZ on MySQL and SQLite (naive, UTC)."""
    return moment.replace(tzinfo=None)


def seed(
    db: Database, tasks: int, seed_value: int = SEED, keep: bool = False, start: int = 0
) -> list[Made]:
    """Fill db (the engine's tables, no task yet) with tasks tasks; every node made if keep
    (a list as long as the nodes: for small datasets). Rows are written on a thread of
    their own while the next are made (the database's work and Python's overlap).

    start: tasks db holds already, from an interrupted seed with the same seed_value (each
    transaction holds whole tasks): they are made again, not written, and the rest follow."""
    generator = Generator(seed_value)
    generator.projects()
    for _ in range(start):
        generator.task()
    if start:
        generator.rows = Rows()
        generator.made.clear()
    pending: queue.Queue[Rows | None] = queue.Queue(maxsize=2)
    written = [0]
    failed: list[BaseException] = []
    started = time.monotonic()

    def write() -> None:
        try:
            with db.connection_context():
                if isinstance(db, MySQLDatabase):  # every key is new: InnoDB need not look
                    db.execute_sql("SET SESSION unique_checks = 0, foreign_key_checks = 0")
                while (rows := pending.get()) is not None:
                    with db.atomic():
                        for table in ORDER:
                            _insert(db, table, rows.tables[table])
                    written[0] += len(rows)
        except BaseException as exc:  # handed to the caller below
            failed.append(exc)
            while pending.get() is not None:
                pass

    writer = threading.Thread(target=write, name="bksops-seed-writer")
    writer.start()
    try:
        for made in range(start, tasks):
            generator.task()
            if len(generator.rows) >= COMMIT_EVERY or made == tasks - 1:
                if failed:
                    break
                pending.put(generator.rows)
                generator.rows = Rows()
                if not keep:
                    generator.made.clear()
                rate = written[0] / max(time.monotonic() - started, 1e-9)
                print(
                    f"\r{made + 1:,}/{tasks:,} tasks made, {written[0]:,} rows written, "
                    f"{rate:,.0f} rows/s",
                    end="",
                    file=sys.stderr,
                )
    finally:
        pending.put(None)
        writer.join()
    print(file=sys.stderr)
    if failed:
        raise RuntimeError(f"writing failed: {failed[0]}") from failed[0]
    settle(db, ORDER)
    return generator.made


def _insert(db: Database, table: str, rows: list[Row]) -> None:
    if not rows:
        return
    quote = "`" if isinstance(db, MySQLDatabase) else '"'
    columns = ", ".join(f"{quote}{c}{quote}" for c in COLUMNS[table])
    one = "(" + ", ".join([db.param] * len(COLUMNS[table])) + ")"
    if isinstance(db, PostgresqlDatabase):
        rows = [_aware(row) for row in rows]
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        sql = f"INSERT INTO {table} ({columns}) VALUES {', '.join([one] * len(batch))}"
        db.execute_sql(sql, [value for row in batch for value in row])


def _aware(row: Row) -> Row:
    """Times as PostgreSQL's timestamptz wants them (UTC, aware)."""
    return tuple(
        v.replace(tzinfo=datetime.UTC) if isinstance(v, datetime.datetime) else v for v in row
    )


def open_writer(url: str) -> Database:
    """A database to fill: SQLite's file opened for writing; a server database through the
    store's own pools (open_read_only reads only a SQLite file read-only)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return SqliteDatabase(unquote(parts.path[1:]), pragmas={"journal_mode": "wal"})
    return open_read_only(url)


def tasks_in(db: Database) -> int:
    """How many tasks the database holds (0 for none, or no bk-sops tables)."""
    with db.connection_context():
        try:
            return int(
                db.execute_sql("SELECT COUNT(*) FROM taskflow3_taskflowinstance").fetchone()[0]
            )
        except DatabaseError:  # no such table: an empty database
            return 0


def sample(made: list[Made], count: int, rng: random.Random) -> Iterator[Made]:
    """count nodes of made that ran, at random."""
    ran = [m for m in made if m.state is not None]
    for _ in range(count):
        yield rng.choice(ran)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.db.bksops_scale", description=__doc__)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--database-url", required=True, help="a database with the engine's tables")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    db = open_writer(args.database_url)
    if tasks_in(db):
        raise SystemExit("the database already holds tasks: give an empty one")
    seed(db, args.tasks, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

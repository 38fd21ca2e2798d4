"""A large, realistic, deterministic dataset, for measuring the store at scale.

    python -m server.db.scale --tasks 12000            # or --nodes 1000000
    make seed-large TASKS=12000 [TASKNODE_DATABASE_URL=postgresql://...]

It fills an empty database (TASKNODE_DATABASE_URL, or --database-url) with tasks
of ~90 nodes each, as the engine leaves them: 35-60 nodes at the root, 2-3
sub-processes of 5-12 nodes, most of those with a sub-process of 3-8 nodes inside
(two levels deep), start and end events at every level; finished, failed,
running and never-started tasks; some nodes retried, some looped (with the
attempts that leaves behind); inputs and outputs of every JSON kind for a few
component schemas. The same seed gives the same rows, task and node ids included.

Rows go in through the models: each model's insert_many statement is compiled
once per batch size and run with the rows bound as its parameters, a thousand rows
a statement, about 20,000 a transaction, on a writer thread while the next rows
are made. At the end the tables are analyzed (and vacuumed, on PostgreSQL), as a
database in use would be. It prints rows per second when done.
"""

from __future__ import annotations

import argparse
import hashlib
import queue
import random
import sys
import threading
from collections.abc import Callable
from typing import Any

from peewee import Database
from peewee import Field
from peewee import MySQLDatabase
from peewee import PostgresqlDatabase

from server import logs
from server import values
from server.config import Config
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.models import Attempt
from server.db.models import BaseModel
from server.db.models import ComponentSchema
from server.db.models import Node
from server.db.models import Project
from server.db.models import Task
from server.progress import Progress

SEED = 20190117
#: Rows per INSERT: under SQLite's limit of 32,766 parameters at 21 columns a row.
BATCH = 1000
#: Rows per transaction.
COMMIT_EVERY = 20_000
BUSINESSES = 20
FIRST_ID = 1_000_000
#: Microseconds since the epoch of the first task's start (2024-01-01T00:00:00Z).
EPOCH = 1_704_067_200_000_000
SECOND = 1_000_000

#: (code, versions, [(output key, display name)]) of the plugins nodes run.
COMPONENTS: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]], ...] = (
    (
        "job_fast_execute_script",
        ("legacy", "v1.1"),
        (("job_inst_id", "task ID"), ("job_inst_url", "link")),
    ),
    ("job_push_local_files", ("legacy",), (("job_inst_id", "task ID"), ("files", "files"))),
    ("bk_http_request", ("v1.0",), (("status_code", "status"), ("body", "body"))),
    ("cc_transfer_host_module", ("legacy",), (("transfer_result", "result"),)),
    ("sleep_timer", ("legacy",), ()),
    ("bk_approve", ("v1.0",), (("approved", "approved"), ("approver", "approver"))),
)
NODE_FIELDS: tuple[Field, ...] = (
    Node.task, Node.node_id, Node.parent_node_id, Node.path, Node.position, Node.name,
    Node.kind, Node.component_code, Node.component_version, Node.error_ignorable, Node.state,
    Node.loop, Node.retry, Node.skip, Node.error_ignored, Node.version, Node.started_at,
    Node.finished_at, Node.inputs, Node.outputs, Node.ex_data, Node.name_null,
)  # fmt: skip
ATTEMPT_FIELDS: tuple[Field, ...] = (
    Attempt.task, Attempt.node_id, Attempt.loop, Attempt.retry, Attempt.skip, Attempt.version,
    Attempt.state, Attempt.started_at, Attempt.finished_at, Attempt.inputs, Attempt.outputs,
    Attempt.ex_data,
)  # fmt: skip
TASK_FIELDS: tuple[Field, ...] = (
    Task.id, Task.project, Task.name, Task.deleted, Task.digest, Task.pipeline_id,
)  # fmt: skip
PROJECT_FIELDS: tuple[Field, ...] = (Project.id, Project.name, Project.bk_biz_id)
COMPONENT_FIELDS: tuple[Field, ...] = (
    ComponentSchema.code,
    ComponentSchema.version,
    ComponentSchema.outputs,
)
VERBS = ("Deploy", "Check", "Backup", "Restart", "Push", "Verify", "Notify", "Drain", "Scale")
THINGS = ("web tier", "cache", "config", "release", "canary hosts", "database", "gateway")
ERRORS = (
    "Traceback (most recent call last):\n  ...\nTimeoutError: job 3 exceeded 600s",
    "script exited with code 1: /data/release/install.sh: line 42: permission denied",
    'HTTP 502 from http://cmdb.example/api/v3/hosts: {"result": false, "code": 1199014}',
)
Row = tuple[Any, ...]


class StopsOnce:
    """A task's run: nodes finish until it stops, one stops it, the rest never run."""

    #: Nodes still to finish before the task stops (None: all of them), and the state of
    #: the node it stops at (None: it never started).
    finishing: int | None = None
    stop: str | None = None

    def _next_state(self) -> str | None:
        """FINISHED until the task stops; then its stopping state once; then not run."""
        if self.finishing is None:
            return "FINISHED"
        self.finishing -= 1
        if self.finishing >= 0:
            return "FINISHED"
        return self.stop if self.finishing == -1 else None


class Generator(StopsOnce):
    """Makes the rows of one task after another, from one seeded random source."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        #: Per (code, version): a few dozen input and output texts to draw from.
        self.payloads = {
            (code, version): (
                [values.dumps(self._inputs()) for _ in range(32)],
                [values.dumps(self._outputs(keys)) for _ in range(32)],
            )
            for code, versions, keys in COMPONENTS
            for version in versions
        }
        self.tasks_made = 0
        self.nodes: list[Row] = []
        self.attempts: list[Row] = []

    def take(self) -> tuple[list[Row], list[Row]]:
        """The node and attempt rows made since the last take()."""
        taken = self.nodes, self.attempts
        self.nodes, self.attempts = [], []
        return taken

    def projects(self) -> list[Row]:
        return [(FIRST_ID + b, f"Scale business {b}", FIRST_ID + b) for b in range(BUSINESSES)]

    def components(self) -> list[Row]:
        return [
            (code, version, values.dumps([list(k) for k in keys]))
            for code, versions, keys in COMPONENTS
            for version in versions
        ]

    def task(self) -> Row:
        """The next task's row; its nodes and attempts join self.nodes and self.attempts."""
        index = self.tasks_made
        self.tasks_made += 1
        task_id = FIRST_ID + index
        rng = self.rng
        self.task_id = task_id
        self.clock = EPOCH + index * 600 * SECOND
        outcome = rng.choices(("finished", "failed", "running", "new"), (70, 15, 10, 5))[0]
        #: Nodes that run to FINISHED before the task stops (None: all of them), and the
        #: state of the node it stops at (None: it never started).
        self.finishing: int | None = None if outcome == "finished" else rng.randint(1, 60)
        self.stop: str | None = {"failed": "FAILED", "running": "RUNNING"}.get(outcome)
        if outcome == "new":
            self.finishing = 0
        self._level("", (), 0)
        digest = hashlib.sha256(f"scale {self.seed} {task_id}".encode()).hexdigest()
        project = FIRST_ID + index % BUSINESSES
        return (task_id, project, f"{rng.choice(VERBS)} release {index}", False, digest, "")

    def _level(
        self, parent: str, path: tuple[str, ...], depth: int
    ) -> tuple[str | None, int | None]:
        """Append one level's nodes in running order; its (state, started_at) for the parent."""
        rng = self.rng
        if depth == 0:
            kinds = ["ServiceActivity"] * rng.randint(33, 56) + ["SubProcess"] * rng.randint(2, 3)
        elif depth == 1:
            kinds = ["ServiceActivity"] * rng.randint(5, 11)
            kinds += ["SubProcess"] * (rng.random() < 0.8)
        else:
            kinds = ["ServiceActivity"] * rng.randint(3, 8)
        rng.shuffle(kinds)
        kinds = ["EmptyStartEvent", *kinds, "EmptyEndEvent"]
        path_text = values.dumps(list(path))
        states: list[str | None] = []
        started: int | None = None
        for position, kind in enumerate(kinds):
            node_id = f"node{rng.getrandbits(112):028x}"
            if kind == "SubProcess":
                state, begun = self._subprocess(node_id, parent, path, path_text, position)
            else:
                state, begun = self._activity(node_id, kind, parent, path_text, position)
            states.append(state)
            started = started if started is not None else begun
        for final in ("FAILED", "RUNNING"):
            if final in states:
                return final, started
        return ("FINISHED" if states[-1] == "FINISHED" else None), started

    def _subprocess(
        self, node_id: str, parent: str, path: tuple[str, ...], path_text: str, position: int
    ) -> tuple[str | None, int | None]:
        at = len(self.nodes)
        self.nodes.append(())  # a placeholder: its state comes from its children
        state, started = self._level(node_id, (*path, node_id), len(path) + 1)
        finished = self.clock if state == "FINISHED" else None
        version = f"{self.rng.getrandbits(128):032x}" if state else ""
        self.nodes[at] = (
            self.task_id, node_id, parent, path_text, position, f"Stage {position}",
            "SubProcess", "", "", False, state, 1, 0, False, False, version,
            started, finished, "{}", "{}", None, False,
        )  # fmt: skip
        return state, started

    def _activity(
        self, node_id: str, kind: str, parent: str, path_text: str, position: int
    ) -> tuple[str | None, int | None]:
        rng = self.rng
        if kind == "ServiceActivity":
            code, versions, _ = rng.choice(COMPONENTS)
            version = rng.choice(versions)
            inputs, outputs = self.payloads[code, version]
            name = f"{rng.choice(VERBS)} {rng.choice(THINGS)}"
        else:
            code = version = ""
            inputs = outputs = ["{}"]
            name = kind
        state = self._next_state()
        loop, retry, started, finished, ex_data = 1, 0, None, None, None
        run_version = ""
        if state is not None:
            if kind == "ServiceActivity" and rng.random() < 0.08:
                loop, retry = self._earlier_attempts(node_id, inputs, outputs)
            started = self.clock
            self.clock += rng.randint(1, 300) * SECOND
            finished = self.clock if state != "RUNNING" else None
            ex_data = rng.choice(ERRORS) if state == "FAILED" else None
            run_version = f"{rng.getrandbits(128):032x}"
        row = (
            self.task_id, node_id, parent, path_text, position, name, kind, code, version,
            rng.random() < 0.05, state, loop, retry, False, False, run_version, started,
            finished, rng.choice(inputs), rng.choice(outputs) if state else "{}", ex_data, False,
        )  # fmt: skip
        self.nodes.append(row)
        return state, started

    def _earlier_attempts(
        self, node_id: str, inputs: list[str], outputs: list[str]
    ) -> tuple[int, int]:
        """Attempts of a retried (3 in 4) or looped node; its current (loop, retry)."""
        rng = self.rng
        looped = rng.random() < 0.25
        loop = rng.randint(2, 4) if looped else 1
        retry = 0 if looped else rng.randint(1, 3)
        # An older loop's last run finished; the current loop's earlier tries failed.
        runs: list[tuple[int, int, str | None]] = [(n, 0, "FINISHED") for n in range(1, loop)]
        runs += [(loop, r, None) for r in range(retry)]
        for run_loop, run_retry, state in runs:
            started = self.clock
            self.clock += rng.randint(1, 120) * SECOND
            row = (
                self.task_id, node_id, run_loop, run_retry, False,
                f"{rng.getrandbits(128):032x}", state, started, self.clock, rng.choice(inputs),
                rng.choice(outputs), None if state else rng.choice(ERRORS),
            )  # fmt: skip
            self.attempts.append(row)
        return loop, retry

    def _inputs(self) -> dict[str, Any]:
        rng = self.rng
        return {
            "biz_cc_id": rng.randint(1, 5000),
            "job_script_source": rng.choice(("manual", "general", "public")),
            "job_content": "#!/bin/bash\n" + "echo step\n" * rng.randint(1, 40),
            "job_ip_list": [f"10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in "xyz"],
            "job_timeout": rng.choice((None, 600, 3600)),
            "job_rolling": {"enabled": rng.random() < 0.2, "batch": rng.randint(1, 10)},
        }

    def _outputs(self, keys: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        rng = self.rng
        kinds: tuple[Callable[[], Any], ...] = (
            lambda: rng.randint(1, 2**62),
            lambda: round(rng.random() * 1000, 3),
            lambda: f"http://job.example/{rng.getrandbits(32):x}",
            lambda: None,
            lambda: [rng.randint(0, 9) for _ in range(rng.randint(0, 4))],
            lambda: {"ok": rng.random() < 0.9, "hosts": rng.randint(1, 500)},
        )
        found = {key: rng.choice(kinds)() for key, _ in keys}
        found.update(_result=rng.random() < 0.95, _loop=1, _inner_loop=1)
        return found


#: Rows for one model: (model, its fields in column order, the rows).
Batch = tuple[type[BaseModel], tuple[Field, ...], list[Row]]


class Writer:
    """Inserts through the models on a thread of its own, a transaction per put().

    Making rows is Python's work; storing them is mostly the database's, and the
    driver waits for it with the GIL released. Handing the rows to this thread lets
    the two overlap on two cores (measured: 17% faster on SQLite, 33% on PostgreSQL).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        #: Rows written (and committed) so far.
        self.rows = 0
        self._statements: dict[tuple[type[BaseModel], int], str] = {}
        self._queue: queue.Queue[list[Batch] | None] = queue.Queue(maxsize=2)
        self._failed: BaseException | None = None
        self._abandon = False
        self._thread = threading.Thread(target=self._run, name="seed-writer")
        self._thread.start()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self._abandon = exc_type is not None
        self._put(None, check=False)
        self._thread.join()
        if self._failed is not None and exc_type is None:
            raise RuntimeError(f"writing failed: {self._failed}") from self._failed

    def put(self, batches: list[Batch]) -> None:
        """Write these rows in one transaction, soon; waits while two are queued already."""
        self._put(batches)

    def _put(self, item: list[Batch] | None, check: bool = True) -> None:
        while True:
            if check and self._failed is not None:
                raise RuntimeError(f"writing failed: {self._failed}") from self._failed
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            with self.db.connection_context():
                while (batches := self._queue.get()) is not None:
                    if self._abandon:
                        continue
                    with self.db.atomic():
                        for model, fields, rows in batches:
                            self._insert(model, fields, rows)
                    self.rows += sum(len(rows) for _, _, rows in batches)
        except BaseException as exc:  # handed to the main thread by put() and __exit__
            self._failed = exc
            while self._queue.get() is not None:  # let put() and __exit__ finish
                pass

    def _insert(self, model: type[BaseModel], fields: tuple[Field, ...], rows: list[Row]) -> None:
        for start in range(0, len(rows), BATCH):
            batch = rows[start : start + BATCH]
            params = [value for row in batch for value in row]
            key = (model, len(batch))
            sql = self._statements.get(key)
            if sql is None:
                query = model.insert_many(batch, fields=list(fields)).returning()
                sql, compiled = query.sql()
                if compiled != params:  # peewee binds in column order, not in ours
                    raise ValueError(f"{model.__name__}: list the fields in column order")
                self._statements[key] = sql
            self.db.execute_sql(sql, params)


def seed(db: Database, tasks: int | None, nodes: int | None, seed_value: int = SEED) -> int:
    """Fill db, which must hold no task yet, with that many tasks (or nodes); the rows written."""
    with db.connection_context():
        if Task.select().exists():
            raise SystemExit(
                "error: the database already holds tasks; seed-large fills an empty one "
                "(name another with TASKNODE_DATABASE_URL or --database-url)"
            )
    generator = Generator(seed_value)
    by_tasks = tasks is not None
    target = (tasks if by_tasks else nodes) or 0
    progress = Progress(target, "tasks" if by_tasks else "nodes", "seeding")
    with Writer(db) as writer:
        writer.put(
            [
                (Project, PROJECT_FIELDS, generator.projects()),
                (ComponentSchema, COMPONENT_FIELDS, generator.components()),
            ]
        )
        made = 0  # tasks or nodes, as the target counts
        pending: list[Row] = []
        while made < target:
            before = len(generator.nodes)
            pending.append(generator.task())
            made += 1 if by_tasks else len(generator.nodes) - before
            if len(generator.nodes) + len(generator.attempts) >= COMMIT_EVERY or made >= target:
                nodes_made, attempts_made = generator.take()
                writer.put(
                    [
                        (Task, TASK_FIELDS, pending),
                        (Node, NODE_FIELDS, nodes_made),
                        (Attempt, ATTEMPT_FIELDS, attempts_made),
                    ]
                )
                pending = []
                progress.update(made, _rate(writer.rows, progress.elapsed()))
    settle(db)
    elapsed = progress.elapsed()
    progress.done(_rate(writer.rows, elapsed))
    print(
        f"{writer.rows:,} rows in {elapsed:.1f}s: {writer.rows / elapsed:,.0f} rows/s",
        file=sys.stderr,
    )
    return writer.rows


def _rate(rows: int, seconds: float) -> str:
    return f"{rows:,} rows  {rows / max(seconds, 1e-9):,.0f} rows/s"


def settle(db: Database, tables: tuple[str, ...] | None = None) -> None:
    """Bring the planner's statistics (and PostgreSQL's visibility map) up to date.

    A database in use has them; right after a bulk load the first reads of each page
    would otherwise also write it (PostgreSQL's hint bits), which a benchmark would
    count against the lookups.
    """
    if tables is None:
        tables = tuple(model._meta.table_name for model in (Task, Node, Attempt))
    with db.connection_context():
        if isinstance(db, PostgresqlDatabase):
            for table in tables:
                db.execute_sql(f"VACUUM ANALYZE {table}")  # not in a transaction: autocommit
        elif isinstance(db, MySQLDatabase):
            db.execute_sql(f"ANALYZE TABLE {', '.join(tables)}")
        else:
            db.execute_sql("ANALYZE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.db.scale", description=__doc__)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--tasks", type=int, help="how many tasks to make")
    size.add_argument("--nodes", type=int, help="make tasks until there are this many nodes")
    parser.add_argument("--database-url", help="default: TASKNODE_DATABASE_URL")
    parser.add_argument("--seed", type=int, default=SEED, help="the random seed (%(default)s)")
    args = parser.parse_args(argv)
    config = Config.from_env()
    logs.configure(config)
    url = args.database_url or config.database_url
    db = open_database(url)
    ensure_schema(db)
    seed(db, args.tasks, args.nodes, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

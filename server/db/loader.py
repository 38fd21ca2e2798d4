"""Loading an import file: businesses, component schemas, tasks with their nodes.

The format is documented in docs/import-format.md. A file is checked whole
before anything is written, then written in one transaction: a bad file is
refused with a message naming the record and the field, and nothing of it is
loaded. Loading is idempotent: a task whose record is unchanged since it was
last loaded is not touched (not even its attempt ids), a changed task is
replaced whole, and businesses and schemas are upserted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from pathlib import Path
from typing import Any

from bksops.tasknode.v1 import task_node_pb2
from peewee import Database

from server import values
from server.db.models import Attempt
from server.db.models import CatalogStamp
from server.db.models import ComponentSchema
from server.db.models import Node
from server.db.models import Project
from server.db.models import Task
from server.progress import Progress

FORMAT = "tasknode-import/1"
#: Engine state names, from the contract's NodeState (without the NODE_STATE_ prefix).
STATES = frozenset(
    name.removeprefix("NODE_STATE_")
    for name in task_node_pb2.NodeState.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
    if name != "NODE_STATE_UNSPECIFIED"
)
SUBPROCESS = "SubProcess"
BATCH = 500


class LoadError(ValueError):
    """The import file is bad; the message names the record and the field."""


@dataclass
class LoadReport:
    """What a load wrote and what it found already up to date."""

    projects_written: int = 0
    components_written: int = 0
    tasks_written: int = 0
    tasks_unchanged: int = 0
    nodes_written: int = 0
    attempts_written: int = 0

    def __str__(self) -> str:
        return (
            f"{self.projects_written} businesses, {self.components_written} component schemas, "
            f"{self.tasks_written} tasks ({self.nodes_written} nodes, {self.attempts_written} "
            f"attempts) written; {self.tasks_unchanged} tasks unchanged"
        )


def load_file(db: Database, path: str | Path, show_progress: bool = False) -> LoadReport:
    """Load the import file at path (see load_document)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path}: cannot read: {exc}") from exc
    try:
        document = values.loads(text)
    except (ValueError, RecursionError) as exc:
        raise LoadError(f"{path}: not valid JSON: {exc}") from exc
    return load_document(db, document, show_progress, label=str(path))


def load_document(
    db: Database, document: Any, show_progress: bool = False, label: str = "loading"
) -> LoadReport:
    """Check the whole document, then write it in one transaction.

    show_progress: draw a bar of the task rows (tasks, nodes, attempts) written, when
    stderr is a terminal (server.progress)."""
    plan = _plan(document)
    report = LoadReport()
    rows = sum(1 + len(task.nodes) + len(task.attempts) for task in plan.tasks)
    progress = Progress(rows, "rows", label, enabled=None if show_progress else False)
    with db.atomic():
        for row in plan.projects:
            report.projects_written += _upsert(Project, Project.id == row["id"], row)
        for row in plan.components:
            where = (ComponentSchema.code == row["code"]) & (
                ComponentSchema.version == row["version"]
            )
            report.components_written += _upsert(ComponentSchema, where, row)
        if report.projects_written or report.components_written:
            CatalogStamp.update(stamp=CatalogStamp.stamp + 1).where(CatalogStamp.id == 1).execute()
        known = {p.id for p in Project.select(Project.id)}
        for task in plan.tasks:
            if task.row["project"] not in known:
                raise LoadError(
                    f"{task.where}.project_id: business/project {task.row['project']} "
                    "is neither in this file nor in the database"
                )
            _write_task(task, report, progress)
    progress.done()
    return report


def _upsert(model: Any, where: Any, row: dict[str, Any]) -> int:
    """Insert row, or update the existing one if it differs; 1 if anything was written."""
    current = model.select(*[getattr(model, k) for k in row]).where(where).dicts().first()
    if current == row:
        return 0
    if current is None:
        model.insert(row).execute()
    else:
        model.update(row).where(where).execute()
    return 1


def _write_task(task: _TaskPlan, report: LoadReport, progress: Progress) -> None:
    stored = Task.select(Task.digest).where(Task.id == task.row["id"]).scalar()
    if stored == task.row["digest"]:
        report.tasks_unchanged += 1
        progress.advance(1 + len(task.nodes) + len(task.attempts))
        return
    Attempt.delete().where(Attempt.task == task.row["id"]).execute()
    Node.delete().where(Node.task == task.row["id"]).execute()
    if stored is None:
        Task.insert(task.row).execute()
    else:
        Task.update(task.row).where(Task.id == task.row["id"]).execute()
    progress.advance()
    for batch in _batches(task.nodes):
        Node.insert_many(batch).execute()
        progress.advance(len(batch))
    for batch in _batches(task.attempts):
        Attempt.insert_many(batch).execute()
        progress.advance(len(batch))
    report.tasks_written += 1
    report.nodes_written += len(task.nodes)
    report.attempts_written += len(task.attempts)


def _batches(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), BATCH):
        yield rows[start : start + BATCH]


# Checking -----------------------------------------------------------------------------


@dataclass
class _TaskPlan:
    where: str
    row: dict[str, Any]
    nodes: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Plan:
    projects: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[_TaskPlan] = field(default_factory=list)


class _Record:
    """One JSON object of the file, read field by field with errors that name it."""

    def __init__(self, value: Any, where: str, allowed: Iterable[str]) -> None:
        if not isinstance(value, dict):
            raise LoadError(f"{where}: must be an object, not {_kind(value)}")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            shown = unknown[0].encode("utf-8", "backslashreplace").decode("utf-8")
            raise LoadError(f"{where}.{shown}: unknown field")
        self.value = value
        self.where = where

    def at(self, name: str) -> str:
        return f"{self.where}.{name}"

    def get(self, name: str, default: Any = None) -> Any:
        return self.value.get(name, default)

    def integer(self, name: str, minimum: int, default: int | None = None) -> int:
        found = self.value.get(name, default)
        if found is None:
            raise LoadError(f"{self.at(name)}: required")
        if isinstance(found, bool) or not isinstance(found, int):
            raise LoadError(f"{self.at(name)}: must be an integer, not {_kind(found)}")
        if not minimum <= found <= values.INT64_MAX:
            raise LoadError(f"{self.at(name)}: {found} is out of range (at least {minimum})")
        return found

    def text(self, name: str, default: str | None = None, max_length: int = 255) -> str:
        found = self.value.get(name, default)
        if found is None:
            raise LoadError(f"{self.at(name)}: required")
        if not isinstance(found, str):
            raise LoadError(f"{self.at(name)}: must be a string, not {_kind(found)}")
        if len(found) > max_length:
            raise LoadError(f"{self.at(name)}: longer than {max_length} characters")
        return _checked_text(found, self.at(name))

    def flag(self, name: str, default: bool = False) -> bool:
        found = self.value.get(name, default)
        if not isinstance(found, bool):
            raise LoadError(f"{self.at(name)}: must be true or false, not {_kind(found)}")
        return found

    def items(self, name: str) -> list[Any]:
        found = self.value.get(name, [])
        if not isinstance(found, list):
            raise LoadError(f"{self.at(name)}: must be a list, not {_kind(found)}")
        return found

    def json_object(self, name: str, nullable: bool = False) -> str:
        """The object's storage text; with nullable, null too (stored as "null")."""
        found = self.value.get(name, {})
        if not isinstance(found, dict) and not (nullable and found is None):
            raise LoadError(f"{self.at(name)}: must be an object, not {_kind(found)}")
        try:
            values.check(found, self.at(name))
        except values.ValueProblem as exc:
            raise LoadError(str(exc)) from None
        return values.dumps(found)

    def optional_text(self, name: str, required: bool = False, max_length: int = 255) -> str | None:
        """A string or null; with required, the field must be there (null allowed)."""
        if required and name not in self.value:
            raise LoadError(f"{self.at(name)}: required")
        found = self.value.get(name)
        if found is None:
            return None
        if not isinstance(found, str):
            raise LoadError(f"{self.at(name)}: must be a string or null, not {_kind(found)}")
        if required and len(found) > max_length:
            raise LoadError(f"{self.at(name)}: longer than {max_length} characters")
        return _checked_text(found, self.at(name))

    def renamed(self, name: str) -> str | None:
        """{output key: key shown} as stored ([[key, shown], ...] text); None for none."""
        found = self.value.get(name, {})
        if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
            raise LoadError(f"{self.at(name)}: must be an object of strings")
        for key, shown in found.items():
            _checked_text(key, self.at(name))
            _checked_text(shown, f"{self.at(name)}.{key}")
        return values.dumps([[key, shown] for key, shown in found.items()]) if found else None

    def state(self, name: str) -> str:
        found = self.text(name)
        if found not in STATES:
            raise LoadError(f"{self.at(name)}: {found!r} is not an engine state")
        return found

    def time(self, name: str, required: bool) -> int | None:
        found = self.value.get(name)
        if found is None:
            if required:
                raise LoadError(f"{self.at(name)}: required")
            return None
        if not isinstance(found, str):
            raise LoadError(f"{self.at(name)}: must be an ISO 8601 time string")
        try:
            moment = datetime.fromisoformat(found)
        except ValueError:
            raise LoadError(f"{self.at(name)}: {found!r} is not an ISO 8601 time") from None
        if moment.utcoffset() is None:
            raise LoadError(f"{self.at(name)}: {found!r} has no UTC offset")
        whole = int(moment.timestamp())
        return whole * 1_000_000 + moment.microsecond


def _checked_text(text: str, where: str) -> str:
    """text, unless it holds half a surrogate pair, which no database can store."""
    try:
        values.check_text(text, where)
    except values.ValueProblem as exc:
        raise LoadError(str(exc)) from None
    return text


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _plan(document: Any) -> _Plan:
    top = _Record(document, "file", ("format", "projects", "components", "tasks"))
    if top.get("format") != FORMAT:
        raise LoadError(f"file.format: must be {FORMAT!r}")
    plan = _Plan()
    seen_projects: set[int] = set()
    for i, value in enumerate(top.items("projects")):
        r = _Record(value, f"projects[{i}]", ("id", "name", "bk_biz_id"))
        row: dict[str, Any] = {"id": r.integer("id", 1), "name": r.text("name"), "bk_biz_id": None}
        if r.get("bk_biz_id") is not None:
            row["bk_biz_id"] = r.integer("bk_biz_id", 0)
        if row["id"] in seen_projects:
            raise LoadError(f"{r.at('id')}: project {row['id']} appears twice")
        seen_projects.add(row["id"])
        plan.projects.append(row)
    for i, value in enumerate(top.items("components")):
        r = _Record(value, f"components[{i}]", ("code", "version", "outputs"))
        pairs = []
        for j, out in enumerate(r.items("outputs")):
            o = _Record(out, f"{r.at('outputs')}[{j}]", ("key", "name"))
            pairs.append([o.text("key"), o.text("name")])
        plan.components.append(
            {
                "code": r.text("code"),
                "version": r.text("version", "legacy", 64),
                "outputs": values.dumps(pairs),
            }
        )
    seen_tasks: set[int] = set()
    for i, value in enumerate(top.items("tasks")):
        task = _task(
            _Record(
                value,
                f"tasks[{i}]",
                ("id", "project_id", "name", "deleted", "pipeline_id", "nodes"),
            )
        )
        if task.row["id"] in seen_tasks:
            raise LoadError(f"tasks[{i}].id: task {task.row['id']} appears twice")
        seen_tasks.add(task.row["id"])
        plan.tasks.append(task)
    return plan


NODE_FIELDS = (
    "id",
    "name",
    "type",
    "component",
    "error_ignorable",
    "inputs",
    "outputs",
    "ex_data",
    "execution",
    "attempts",
    "children",
    "renamed",
)
EXECUTION_FIELDS = (
    "state",
    "loop",
    "retry",
    "skip",
    "error_ignored",
    "version",
    "start_time",
    "finish_time",
)
ATTEMPT_FIELDS = (
    "id",
    "loop",
    "retry",
    "skip",
    "version",
    "state",
    "start_time",
    "finish_time",
    "inputs",
    "outputs",
    "ex_data",
)


def _task(r: _Record) -> _TaskPlan:
    task = _TaskPlan(
        r.where,
        {
            "id": r.integer("id", 1),
            "project": r.integer("project_id", 1),
            "name": r.text("name"),
            "deleted": r.flag("deleted"),
            "digest": "",
            "pipeline_id": r.text("pipeline_id", "", 64),
        },
    )
    seen: set[str] = set()
    root: tuple[str, ...] = ()
    pending = [(n, f"{r.at('nodes')}[{j}]", root, j) for j, n in enumerate(r.items("nodes"))]
    while pending:
        value, where, path, position = pending.pop(0)
        node = _Record(value, where, NODE_FIELDS)
        node_id = node.text("id", max_length=64)
        if not node_id:
            raise LoadError(f"{node.at('id')}: must not be empty")
        if node_id in seen:
            raise LoadError(f"{node.at('id')}: node {node_id} appears twice in the task")
        seen.add(node_id)
        task.nodes.append(_node_row(node, task.row["id"], node_id, path, position))
        for k, attempt in enumerate(node.items("attempts")):
            a = _Record(
                attempt,
                f"{node.at('attempts')}[{k}]",
                ATTEMPT_FIELDS,
            )
            task.attempts.append(
                {
                    "task": task.row["id"],
                    "node_id": node_id,
                    "loop": a.integer("loop", 1),
                    "retry": a.integer("retry", 0, 0),
                    "skip": a.flag("skip"),
                    "version": a.text("version", "", 64),
                    "state": a.state("state") if a.get("state") is not None else None,
                    "started_at": a.time("start_time", required=True),
                    "finished_at": a.time("finish_time", required=True),
                    "inputs": a.json_object("inputs"),
                    "outputs": a.json_object("outputs"),
                    "ex_data": a.optional_text("ex_data"),
                    "history_id": a.integer("id", 1) if a.get("id") is not None else None,
                }
            )
        children = node.items("children")
        if children and task.nodes[-1]["kind"] != SUBPROCESS:
            raise LoadError(f"{node.at('children')}: only a {SUBPROCESS} node has children")
        pending.extend(
            (c, f"{node.at('children')}[{j}]", (*path, node_id), j) for j, c in enumerate(children)
        )
    # Last: only a record whose every string was checked encodes as UTF-8.
    task.row["digest"] = hashlib.sha256(
        json.dumps(r.value, ensure_ascii=False, separators=(",", ":")).encode()
    ).hexdigest()
    return task


def _node_row(
    node: _Record, task_id: int, node_id: str, path: tuple[str, ...], position: int
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "task": task_id,
        "node_id": node_id,
        "parent_node_id": path[-1] if path else "",
        "path": values.dumps(list(path)),
        "position": position,
        "name": node.optional_text("name", required=True) or "",
        "name_null": node.get("name", "") is None,
        "kind": node.text("type", "ServiceActivity", 64),
        "error_ignorable": node.flag("error_ignorable"),
        "inputs": node.json_object("inputs"),
        "outputs": node.json_object("outputs", nullable=True),
        "renamed": node.renamed("renamed"),
        "ex_data": node.optional_text("ex_data"),
        "component_code": "",
        "component_version": "",
        "state": None,
        "loop": 1,
        "retry": 0,
        "skip": False,
        "error_ignored": False,
        "version": "",
        "started_at": None,
        "finished_at": None,
    }
    if node.get("component") is not None:
        c = _Record(node.get("component"), node.at("component"), ("code", "version"))
        row["component_code"] = c.text("code")
        row["component_version"] = c.text("version", "legacy", 64)
    if node.get("execution") is not None:
        e = _Record(
            node.get("execution"),
            node.at("execution"),
            EXECUTION_FIELDS,
        )
        row.update(
            state=e.state("state"),
            loop=e.integer("loop", 1, 1),
            retry=e.integer("retry", 0, 0),
            skip=e.flag("skip"),
            error_ignored=e.flag("error_ignored"),
            version=e.text("version", "", 64),
            started_at=e.time("start_time", required=False),
            finished_at=e.time("finish_time", required=False),
        )
    return row

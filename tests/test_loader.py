"""The import format: loading, idempotence, and refusing bad files whole."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from peewee import Database

from server.config import Config
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.loader import LoadError
from server.db.loader import load_document
from server.db.loader import load_file
from server.db.models import Attempt
from server.db.models import Node
from server.db.models import Project
from server.db.models import Task


@pytest.fixture
def db(config: Config) -> Iterator[Database]:
    database = open_database(config.database_url)
    ensure_schema(database)
    with database.connection_context():
        yield database


@pytest.fixture
def demo() -> dict[str, Any]:
    text = resources.files("server.db").joinpath("demo.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def counts() -> tuple[int, int, int, int]:
    return (
        Project.select().count(),
        Task.select().count(),
        Node.select().count(),
        Attempt.select().count(),
    )


def snapshot() -> list[tuple[Any, ...]]:
    """Every row of the node tables, ids included."""
    return [
        *Node.select().order_by(Node.id).tuples(),
        *Attempt.select().order_by(Attempt.id).tuples(),
        *Task.select().order_by(Task.id).tuples(),
    ]


def test_demo_loads(db: Database, demo: dict[str, Any]) -> None:
    report = load_document(db, demo)
    assert report.tasks_written == 4
    assert counts() == (2, 4, 15, 5)


def test_loading_twice_changes_nothing(db: Database, demo: dict[str, Any]) -> None:
    load_document(db, demo)
    before = snapshot()
    report = load_document(db, copy.deepcopy(demo))
    assert (report.tasks_written, report.tasks_unchanged) == (0, 4)
    assert report.projects_written == report.components_written == 0
    assert snapshot() == before


def test_a_changed_task_is_replaced_whole(db: Database, demo: dict[str, Any]) -> None:
    load_document(db, demo)
    demo["tasks"][1]["nodes"] = demo["tasks"][1]["nodes"][:1]
    report = load_document(db, demo)
    assert (report.tasks_written, report.tasks_unchanged) == (1, 3)
    assert Node.select().where(Node.task == 11).count() == 1
    assert Attempt.select().where(Attempt.task == 11).count() == 2


def test_load_file_reads_a_path(db: Database, demo: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "import.json"
    path.write_text(json.dumps(demo), encoding="utf-8")
    assert load_file(db, path).tasks_written == 4


def break_node(document: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The deepest demo node (task 10 > sub-process > canary > first child), changed."""
    node = document["tasks"][0]["nodes"][1]["children"][1]["children"][0]
    node.update(fields)
    return document


BAD = [
    (lambda d: d.update(format="v9"), "file.format: must be"),
    (lambda d: d.update(extra=1), "file.extra: unknown field"),
    (lambda d: d["projects"][0].update(id="one"), r"projects\[0\]\.id: must be an integer"),
    (
        lambda d: d["projects"].append(d["projects"][0]),
        r"projects\[2\]\.id: project 1 appears twice",
    ),
    (
        lambda d: d["components"][0]["outputs"][1].pop("name"),
        r"components\[0\]\.outputs\[1\]\.name: required",
    ),
    (lambda d: d["tasks"][1].update(project_id=99), r"tasks\[1\]\.project_id: business/project 99"),
    (
        lambda d: break_node(d, execution={"state": "DONE", "version": "x"}),
        r"tasks\[0\]\.nodes\[1\]\.children\[1\]\.children\[0\]\.execution\.state: 'DONE' is not",
    ),
    (
        lambda d: break_node(d, outputs={"n": {1: 2}}),
        r"tasks\[0\]\.nodes\[1\]\.children\[1\]\.children\[0\]\.outputs\.n: key 1 is not",
    ),
    (
        lambda d: break_node(d, renamed={"greeting": 7}),
        r"children\[0\]\.renamed: must be an object of strings",
    ),
    (lambda d: break_node(d, inputs=None), r"children\[0\]\.inputs: must be an object, not null"),
    (
        lambda d: d["tasks"][1]["nodes"][0]["attempts"][0].update(id="h1"),
        r"tasks\[1\]\.nodes\[0\]\.attempts\[0\]\.id: must be an integer",
    ),
    (lambda d: d["tasks"][1].update(pipeline_id=7), r"tasks\[1\]\.pipeline_id: must be a string"),
    (
        lambda d: break_node(d, id="node0df0431f8f553925af01a94854bd"),
        r"children\[0\]\.id: node node0df0431f8f553925af01a94854bd appears twice",
    ),
    (
        lambda d: break_node(d, children=[{"id": "x", "name": "y"}]),
        r"children\[0\]\.children: only a SubProcess node has children",
    ),
    (
        lambda d: d["tasks"][1]["nodes"][0]["attempts"][0].update(start_time="yesterday"),
        r"tasks\[1\]\.nodes\[0\]\.attempts\[0\]\.start_time: 'yesterday' is not an ISO 8601",
    ),
    (
        lambda d: d["tasks"][1]["nodes"][0]["attempts"][1].update(
            finish_time="2026-11-26T02:05:02"
        ),
        r"attempts\[1\]\.finish_time: '2026-11-26T02:05:02' has no UTC offset",
    ),
    (lambda d: d["tasks"][2].update(deleted="no"), r"tasks\[2\]\.deleted: must be true or false"),
]


@pytest.mark.parametrize(("mutate", "message"), BAD)
def test_a_bad_file_is_refused_whole(
    db: Database, demo: dict[str, Any], mutate: Any, message: str
) -> None:
    mutate(demo)
    with pytest.raises(LoadError, match=message):
        load_document(db, demo)
    assert counts() == (0, 0, 0, 0)


def test_a_bad_file_changes_nothing_already_loaded(db: Database, demo: dict[str, Any]) -> None:
    load_document(db, demo)
    before = snapshot()
    changed = copy.deepcopy(demo)
    changed["tasks"][0]["name"] = "renamed"
    changed["tasks"][3]["project_id"] = 404
    with pytest.raises(LoadError):
        load_document(db, changed)
    assert snapshot() == before


@pytest.mark.parametrize("text", ["", "{", '{"format": NaN}', "[1]", "\xff"])
def test_unreadable_files_are_refused(db: Database, tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(LoadError, match=r"bad\.json|file"):
        load_file(db, path)


def run_load(path: Path, database_url: str) -> subprocess.CompletedProcess[str]:
    """`python -m server load path`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "server", "load", str(path)],
        env={**os.environ, "TASKNODE_DATABASE_URL": database_url, "TASKNODE_LOG_FORMAT": "text"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda n: n.update(inputs={"a": ["ok", "x \ud800 y"]}), r"children\[0\]\.inputs\.a\[1\]"),
        (lambda n: n.update(outputs={"\udfff": 1}), r"children\[0\]\.outputs: key"),
        (lambda n: n.update(name="half \ud83d"), r"children\[0\]\.name"),
        (lambda n: n.update(ex_data="\ud800"), r"children\[0\]\.ex_data"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_the_field(
    database_url: str, demo: dict[str, Any], tmp_path: Path, mutate: Any, where: str
) -> None:
    """JSON may spell half a surrogate pair ("\\ud800"); no database can store it. The
    command names the field instead of crashing with a traceback."""
    mutate(break_node(demo)["tasks"][0]["nodes"][1]["children"][1]["children"][0])
    path = tmp_path / "surrogate.json"
    path.write_text(json.dumps(demo), encoding="utf-8")  # ASCII: the escapes stay escapes
    done = run_load(path, database_url)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(where + r".*not valid Unicode text", done.stderr), done.stderr


def test_a_file_of_component_schemas_alone_loads(database_url: str, tmp_path: Path) -> None:
    """Schemas for a server reading bk-sops's database, whose tasks are not loaded."""
    path = tmp_path / "schemas.json"
    path.write_text(
        json.dumps(
            {
                "format": "tasknode-import/1",
                "components": [{"code": "echo", "outputs": [{"key": "out", "name": "Out"}]}],
            }
        ),
        encoding="utf-8",
    )
    done = run_load(path, database_url)
    assert done.returncode == 0, done.stderr
    assert "0 businesses, 1 component schemas, 0 tasks" in done.stdout

"""Schema versions: upgrades keep every row; a newer schema is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources

import pytest
from peewee import Database
from peewee import SqliteDatabase
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_migrations

from server.config import Config
from server.db import migrations
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.loader import load_document
from server.db.models import MODELS
from server.db.models import Attempt
from server.db.models import Node
from server.db.models import Project
from server.db.models import SchemaVersion
from server.db.models import Task


@pytest.fixture
def db(config: Config) -> Iterator[Database]:
    database = open_database(config.database_url)
    with database.connection_context():
        yield database


def schema_of(db: Database) -> dict[str, list[str]]:
    """Table name -> sorted column names, as the database reports them."""
    schema = migrations._current_schema(db)
    return {
        table: sorted(c.name for c in db.get_columns(table, schema=schema))
        for table in sorted(db.get_tables(schema=schema))
    }


def test_an_empty_database_gets_every_migration(db: Database) -> None:
    applied = migrations.migrate(db)
    assert (
        [m.version for m in applied] == [1, 2, 3, 4] == [m.version for m in migrations.MIGRATIONS]
    )
    assert migrations.current_version(db) == migrations.LATEST
    assert migrations.migrate(db) == []


def test_migrations_build_what_the_models_describe(db: Database) -> None:
    migrations.migrate(db)
    expected = {
        m._meta.table_name: sorted(f.column_name for f in m._meta.sorted_fields) for m in MODELS
    }
    assert schema_of(db) == expected


def test_upgrading_a_version_1_database_keeps_every_row(db: Database) -> None:
    assert [m.version for m in migrations.migrate(db, target=1)] == [1]
    demo = json.loads(resources.files("server.db").joinpath("demo.json").read_text("utf-8"))
    # Rows as a version-1 release wrote them: its loader knew no catalog stamp.
    Project.insert_many(demo.pop("projects")).execute()
    demo.pop("components")
    load_document(db, demo)
    before = [
        *Node.select().order_by(Node.id).tuples(),
        *Attempt.select().order_by(Attempt.id).tuples(),
    ]
    assert "app" not in schema_of(db)
    assert [m.version for m in migrations.migrate(db)] == [2, 3, 4]
    after = [
        *Node.select().order_by(Node.id).tuples(),
        *Attempt.select().order_by(Attempt.id).tuples(),
    ]
    assert after == before and len(before) == 20
    assert "app" in schema_of(db)


def test_version_4_adds_the_engine_keys_to_an_older_database(db: Database) -> None:
    """A database made by a release before version 4 (its tables without the columns)
    gets them, its rows kept and given the defaults."""
    migrations.migrate(db, target=3)
    demo = json.loads(resources.files("server.db").joinpath("demo.json").read_text("utf-8"))
    load_document(db, demo)
    dropped = (("task", "pipeline_id"), ("node", "name_null"), ("node", "renamed"))
    migrator = SchemaMigrator.from_database(db)
    if isinstance(db, SqliteDatabase):
        # SQLite drops a column by rebuilding the table: no cascade to the task's nodes.
        db.pragma("foreign_keys", 0)
    run_migrations(
        *(migrator.drop_column(table, column) for table, column in dropped),
        migrator.drop_column("attempt", "history_id"),
    )
    assert "pipeline_id" not in schema_of(db)["task"]
    assert [m.version for m in migrations.migrate(db)] == [4]
    assert schema_of(db)["task"] == sorted(f.column_name for f in Task._meta.sorted_fields)
    assert {(n.name_null, n.renamed) for n in Node.select()} == {(False, None)}
    assert {a.history_id for a in Attempt.select()} == {None}
    assert {t.pipeline_id for t in Task.select()} == {""}


def test_a_newer_schema_is_refused(db: Database, config: Config) -> None:
    migrations.migrate(db)
    SchemaVersion.update(version=migrations.LATEST + 1).execute()
    with pytest.raises(migrations.SchemaTooNew, match=f"schema version {migrations.LATEST + 1}"):
        ensure_schema(db)
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve"],
        env={
            **os.environ,
            "TASKNODE_DATABASE_URL": config.database_url,
            "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
            "TASKNODE_HTTP_ADDR": "127.0.0.1:0",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "knows only up to" in result.stderr


def test_make_migrate_command_upgrades(config: Config) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "migrate"],
        env={**os.environ, "TASKNODE_DATABASE_URL": config.database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "schema upgraded"

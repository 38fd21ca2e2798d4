"""Versioned schema migrations: a newer release upgrades an older database in place.

Each migration moves the schema from version N-1 to N and never touches rows it does
not have to. ``migrate`` applies the missing ones in order, each in its own
transaction with the version bump (on MySQL/MariaDB DDL commits implicitly, so a
failed migration there may leave its tables behind; rerunning skips what exists).
A database whose version is newer than the newest migration here was written by a
newer release: we refuse it rather than guess.

Rule for whoever adds a migration: append to MIGRATIONS, never edit an old one, and
keep the models in server/db/models.py equal to what the migrations build (the test
suite compares them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from peewee import BigIntegerField
from peewee import BooleanField
from peewee import CharField
from peewee import Database
from peewee import PostgresqlDatabase
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_migrations

from server.db import models

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One step: the version it produces, what it is for, and how."""

    version: int
    description: str
    apply: Callable[[Database], None]


def _v1_records(db: Database) -> None:
    db.create_tables(
        [
            models.Project,
            models.Task,
            models.Node,
            models.Attempt,
            models.ComponentSchema,
            models.SchemaVersion,
        ],
        safe=True,
    )


def _v2_credentials(db: Database) -> None:
    db.create_tables([models.App, models.AppGrant, models.UserToken], safe=True)


def _v3_catalog_stamp(db: Database) -> None:
    db.create_tables([models.CatalogStamp], safe=True)
    if not models.CatalogStamp.select().where(models.CatalogStamp.id == 1).exists():
        models.CatalogStamp.insert(id=1, stamp=0).execute()


def _v4_engine_keys(db: Database) -> None:
    """The columns that let a task loaded from a file answer as bk-sops's engine does.

    Version 1 builds its tables from today's models, so a database made new already has
    them: each is added only where missing (a database made by an older release)."""
    migrator = SchemaMigrator.from_database(db)
    schema = _current_schema(db)
    steps = []
    for model, name, column in (
        (models.Task, "pipeline_id", CharField(max_length=64, default="")),
        (models.Node, "name_null", BooleanField(default=False)),
        (models.Node, "renamed", models.JsonTextField(null=True)),
        (models.Attempt, "history_id", BigIntegerField(null=True)),
    ):
        table = model._meta.table_name
        if name not in {c.name for c in db.get_columns(table, schema=schema)}:
            steps.append(migrator.add_column(table, name, column))
    if steps:
        run_migrations(*steps)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "node records: projects, tasks, nodes, attempts, schemas", _v1_records),
    Migration(2, "app credentials, business grants and user tokens", _v2_credentials),
    Migration(3, "a stamp of projects and schemas, for reply caches", _v3_catalog_stamp),
    Migration(4, "engine keys: root pipeline ids, null names, renamed outputs", _v4_engine_keys),
)
LATEST = MIGRATIONS[-1].version


class SchemaTooNew(RuntimeError):
    """The database was written by a newer release than this one."""


def current_version(db: Database) -> int:
    """The database's schema version; 0 for an empty database."""
    table = models.SchemaVersion._meta.table_name
    if not db.table_exists(table, schema=_current_schema(db)):
        return 0
    row = models.SchemaVersion.get_or_none(models.SchemaVersion.id == 1)
    return row.version if row else 0


def migrate(db: Database, target: int = LATEST) -> list[Migration]:
    """Bring the schema up to target; the migrations applied, oldest first."""
    found = current_version(db)
    if found > LATEST:
        raise SchemaTooNew(
            f"the database has schema version {found}, but this release knows only up to "
            f"{LATEST}: run a newer release against it"
        )
    applied = []
    for step in MIGRATIONS:
        if found < step.version <= target:
            with db.atomic():
                step.apply(db)
                bump = models.SchemaVersion.update(version=step.version)
                if not bump.where(models.SchemaVersion.id == 1).execute():
                    models.SchemaVersion.insert(id=1, version=step.version).execute()
            log.info("schema migrated to version %d: %s", step.version, step.description)
            applied.append(step)
    return applied


def _current_schema(db: Database) -> str | None:
    """PostgreSQL's schema on the search_path (peewee would look in "public" only)."""
    if isinstance(db, PostgresqlDatabase):
        row = db.execute_sql("SELECT current_schema()").fetchone()
        return str(row[0]) if row else None
    return None

"""Opening the database a URL names, and creating or checking its schema."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import SplitResult
from urllib.parse import parse_qsl
from urllib.parse import unquote
from urllib.parse import urlsplit

from peewee import Database
from peewee import MySQLDatabase
from peewee import PostgresqlDatabase
from peewee import SqliteDatabase

from server.db.models import MODELS
from server.db.models import SchemaVersion
from server.db.models import database

log = logging.getLogger(__name__)

#: The schema this release writes and reads.
SCHEMA_VERSION = 1

SQLITE_PRAGMAS = {
    "journal_mode": "wal",  # readers never block the writer, nor it them
    "synchronous": "normal",  # safe with WAL; fsync at checkpoints only
    "busy_timeout": 5000,  # ms to wait for a writer's lock instead of failing
    "foreign_keys": 1,
    "cache_size": -16000,  # KiB
}


class DatabaseURLError(ValueError):
    """The database URL cannot be used; the message says why."""


def open_database(url: str) -> Database:
    """A peewee database for url, bound to the models, not yet connected."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        db: Database = _sqlite(url, parts.path)
    elif scheme in ("postgres", "postgresql", "mysql", "mariadb"):
        db = _server(scheme, parts)
    else:
        raise DatabaseURLError(
            f"database URL {url!r}: scheme must be sqlite, postgresql or mysql, not {scheme!r}"
        )
    # Node ids and plugin codes compare byte for byte on every database; MySQL's default
    # collations would find "NODE0DF…" for "node0df…".
    settings = (
        ["DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"] if isinstance(db, MySQLDatabase) else None
    )
    for model in MODELS:
        model._meta.table_settings = settings
    database.initialize(db)
    return db


def _sqlite(url: str, raw_path: str) -> Database:
    # sqlite:///var/x.db is relative (path "/var/x.db" minus the slash);
    # sqlite:////tmp/x.db is absolute.
    path = unquote(raw_path[1:]) if raw_path.startswith("/") else unquote(raw_path)
    if not path or path == ":memory:":
        raise DatabaseURLError(
            f"database URL {url!r}: give a file path; an in-memory database "
            "would be empty in every worker thread"
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return SqliteDatabase(
        path,
        pragmas=SQLITE_PRAGMAS,
        field_types={"JSONTEXT": "TEXT"},
        check_same_thread=False,
        autoconnect=False,
    )


def _server(scheme: str, parts: SplitResult) -> Database:
    from playhouse.pool import PooledMySQLDatabase
    from playhouse.pool import PooledPostgresqlDatabase

    options: dict[str, object] = dict(parse_qsl(parts.query))
    kwargs: dict[str, object] = {
        "host": parts.hostname or "127.0.0.1",
        "max_connections": int(str(options.pop("max_connections", 16))),
        "stale_timeout": 300,  # s an idle pooled connection may live
        "timeout": 10,  # s to wait for a free pooled connection
        "autoconnect": False,
    }
    if parts.port:
        kwargs["port"] = parts.port
    if parts.username:
        kwargs["user"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)
    kwargs.update(options)
    name = unquote(parts.path.lstrip("/"))
    if scheme in ("postgres", "postgresql"):
        return PooledPostgresqlDatabase(name, field_types={"JSONTEXT": "TEXT"}, **kwargs)
    kwargs.setdefault("charset", "utf8mb4")
    return PooledMySQLDatabase(name, field_types={"JSONTEXT": "LONGTEXT"}, **kwargs)


def _current_schema(db: Database) -> str | None:
    """PostgreSQL's schema on the search_path (peewee would look in "public" only)."""
    if isinstance(db, PostgresqlDatabase):
        row = db.execute_sql("SELECT current_schema()").fetchone()
        return str(row[0]) if row else None
    return None


class SchemaTooNew(RuntimeError):
    """The database was written by a newer release than this one."""


def ensure_schema(db: Database) -> bool:
    """Create the tables when missing; True if they were created just now.

    Refuses (SchemaTooNew) a database whose schema is newer than this release's.
    """
    with db.connection_context():
        if not db.table_exists(SchemaVersion._meta.table_name, schema=_current_schema(db)):
            with db.atomic():
                db.create_tables(MODELS)
                SchemaVersion.create(id=1, version=SCHEMA_VERSION)
            log.info("created schema version %d", SCHEMA_VERSION)
            return True
        row = SchemaVersion.get_or_none(SchemaVersion.id == 1)
        found = row.version if row else 0
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database has schema version {found}, but this release knows only "
                f"up to {SCHEMA_VERSION}: run a newer release against it"
            )
        return False

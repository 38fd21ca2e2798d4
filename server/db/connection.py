"""Opening the database a URL names, and creating or checking its schema."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult
from urllib.parse import parse_qsl
from urllib.parse import quote
from urllib.parse import unquote
from urllib.parse import urlsplit

from peewee import Database
from peewee import MySQLDatabase
from peewee import PostgresqlDatabase
from playhouse.pool import PooledSqliteDatabase

from server.db.migrations import migrate
from server.db.models import MODELS
from server.db.models import database
from server.db.pool import KEEPALIVE_COUNT
from server.db.pool import KEEPALIVE_IDLE_SECONDS
from server.db.pool import KEEPALIVE_INTERVAL_SECONDS
from server.db.pool import TCP_USER_TIMEOUT_SECONDS
from server.db.pool import BoundedPool
from server.db.pool import PooledMySQLClientDatabase
from server.db.pool import PooledMySQLDatabase
from server.db.pool import PooledPostgresqlDatabase

log = logging.getLogger(__name__)

SQLITE_PRAGMAS = {
    "journal_mode": "wal",  # readers never block the writer, nor it them
    "synchronous": "normal",  # safe with WAL; fsync at checkpoints only
    "busy_timeout": 5000,  # ms to wait for a writer's lock instead of failing
    "foreign_keys": 1,
    "cache_size": -16000,  # KiB
}


#: Seconds to wait for a database server to accept a connection (libpq, pymysql).
CONNECT_TIMEOUT_SECONDS = 5


class DatabaseURLError(ValueError):
    """The database URL cannot be used; the message says why."""


def open_database(url: str, timeout: float | None = None) -> Database:
    """A peewee database for url, bound to the models, not yet connected.

    Connections to a database server always give up a connect after
    CONNECT_TIMEOUT_SECONDS and a peer silent for TCP_USER_TIMEOUT_SECONDS (TCP
    keepalive, unacknowledged sends). With a timeout (the serving store's), a connect
    gives up after it (2 s at least: libpq's floor), and so does a statement, on the
    server (statement_timeout, max_statement_time) and in pymysql's reads and writes;
    without one (loads, migrations), statements may run as long as they need.
    Parameters the URL gives win.
    """
    db = _open(url, timeout, read_only=False)
    # Node ids and plugin codes compare byte for byte on every database; MySQL's default
    # collations would find "NODE0DF…" for "node0df…".
    settings = (
        ["DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"] if isinstance(db, MySQLDatabase) else None
    )
    for model in MODELS:
        model._meta.table_settings = settings
    database.initialize(db)
    return db


def open_read_only(url: str, timeout: float | None = None) -> Database:
    """A database for url that this process only reads (a bk-sops deployment's), with the
    pools and bounded waits of open_database, not bound to the models.

    A SQLite file is opened with mode=ro and only a busy timeout: open_database's pragmas
    would switch it to WAL, a write that needs the file's exclusive lock and fails while
    its owner writes (docs/bksops-engine.md).
    """
    return _open(url, timeout, read_only=True)


def open_replicas(
    primary: Database, urls: tuple[str, ...], timeout: float | None
) -> list[Database]:
    """The read replicas urls name (server.db.replicas), each a pool of its own.

    Every replica must be of the primary's engine (the store's SQL is built once, in its
    dialect) and a database server: a SQLite file has no replicas.
    """
    if not urls:
        return []
    if not isinstance(primary, (PostgresqlDatabase, MySQLDatabase)):
        raise DatabaseURLError("read replicas need a PostgreSQL or MySQL/MariaDB primary")
    engine = PostgresqlDatabase if isinstance(primary, PostgresqlDatabase) else MySQLDatabase
    opened = [_open(url, timeout, read_only=False) for url in urls]
    for url, db in zip(urls, opened, strict=True):
        if not isinstance(db, engine):
            raise DatabaseURLError(f"replica URL {url!r}: not the primary's database engine")
    return opened


def reopen(db: Database, timeout: float | None) -> Database:
    """Another pool on the database server db was opened on, not bound to the models."""
    url = getattr(db, "url", None)
    if not url:
        raise DatabaseURLError("only a database opened from a server URL can be opened again")
    return _open(str(url), timeout, read_only=False)


def _open(url: str, timeout: float | None, read_only: bool) -> Database:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        return _sqlite(url, parts.path, read_only)
    if scheme in ("postgres", "postgresql", "mysql", "mariadb"):
        db = _server(scheme, parts, timeout)
        db.url = url  # type: ignore[attr-defined]  # for reopen
        return db
    raise DatabaseURLError(
        f"database URL {url!r}: scheme must be sqlite, postgresql or mysql, not {scheme!r}"
    )


def _sqlite(url: str, raw_path: str, read_only: bool = False) -> Database:
    # sqlite:///var/x.db is relative (path "/var/x.db" minus the slash);
    # sqlite:////tmp/x.db is absolute.
    path = unquote(raw_path[1:]) if raw_path.startswith("/") else unquote(raw_path)
    if not path or path == ":memory:":
        raise DatabaseURLError(
            f"database URL {url!r}: give a file path; an in-memory database "
            "would be empty in every worker thread"
        )
    if read_only:
        if not Path(path).is_file():
            raise DatabaseURLError(f"database URL {url!r}: no such file")
        return ReadOnlySqlitePool(
            path,
            pragmas={"busy_timeout": SQLITE_PRAGMAS["busy_timeout"]},
            check_same_thread=False,
            autoconnect=False,
            max_connections=64,
            stale_timeout=None,
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Pooled like the server databases: opening a SQLite connection and setting its
    # pragmas costs more than the queries of a whole call.
    return SqliteFilePool(
        path,
        pragmas=SQLITE_PRAGMAS,
        field_types={"JSONTEXT": "TEXT"},
        check_same_thread=False,
        autoconnect=False,
        max_connections=64,
        stale_timeout=None,
    )


class SqliteFilePool(BoundedPool, PooledSqliteDatabase):
    """A SQLite pool that does not reuse a connection whose file is gone or replaced.

    An open connection keeps reading a deleted or swapped file's old inode; checking
    the path at checkout (one stat, a few µs) makes a restored backup take effect at
    once and a vanished database fail as unavailable instead of serving stale rows.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._files: dict[int, tuple[int, int]] = {}

    def _open(self) -> Any:
        conn = super()._open()
        self._files[id(conn)] = self._file_identity()
        return conn

    def interrupt(self, conn: Any) -> None:
        conn.interrupt()

    def _is_closed(self, conn: Any) -> bool:
        if super()._is_closed(conn):
            return True
        try:
            same = self._files.get(id(conn)) == self._file_identity()
        except OSError:
            same = False
        if not same:
            self._files.pop(id(conn), None)
            conn.close()
        return not same

    def _file_identity(self) -> tuple[int, int]:
        found = os.stat(self.database)
        return found.st_dev, found.st_ino


class ReadOnlySqlitePool(SqliteFilePool):
    """A SQLite pool whose connections open the file with mode=ro: they cannot write it,
    create it, or change its journal mode."""

    def _open(self) -> Any:
        uri = f"file:{quote(self.database)}?mode=ro"
        conn = sqlite3.connect(
            uri, uri=True, timeout=self._timeout, isolation_level=None, **self.connect_params
        )
        try:
            self._add_conn_hooks(conn)
            self._files[id(conn)] = self._file_identity()
        except Exception:
            conn.close()
            raise
        return conn


def _addresses(parts: SplitResult) -> tuple[str, str, list[tuple[str, int | None]]]:
    """(user, password, [(host, port or None)...]) of a URL's netloc, which may name
    several hosts: postgresql://user@host1:5432,host2:5433/db."""
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    found: list[tuple[str, int | None]] = []
    for item in hosts.split(",") if hosts else ["127.0.0.1"]:
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest[1:]
        else:
            host, _, port = item.partition(":")
        try:
            found.append((host or "127.0.0.1", int(port) if port else None))
        except ValueError:
            raise DatabaseURLError(
                f"database URL host {item!r}: the port is not a number"
            ) from None
    return unquote(user), unquote(password), found


def _server(scheme: str, parts: SplitResult, timeout: float | None) -> Database:
    options: dict[str, object] = dict(parse_qsl(parts.query))
    user, password, addresses = _addresses(parts)
    driver = str(options.pop("driver", "pymysql"))
    mysql = scheme in ("mysql", "mariadb")
    if driver not in ("pymysql", "mysqlclient") or (driver != "pymysql" and not mysql):
        raise DatabaseURLError(
            f"database URL: driver must be pymysql or mysqlclient (MySQL only), not {driver!r}"
        )
    kwargs: dict[str, object] = {
        "host": addresses[0][0],
        "max_connections": int(str(options.pop("max_connections", 16))),
        "stale_timeout": 300,  # s an idle pooled connection may live
        "timeout": 10,  # s to wait for a free pooled connection
        "autoconnect": False,
    }
    if addresses[0][1]:
        kwargs["port"] = addresses[0][1]
    if user:
        kwargs["user"] = user
    if password:
        kwargs["password"] = password
    several = len(addresses) > 1
    if several and scheme in ("postgres", "postgresql"):
        # libpq tries the hosts in turn; only the one that takes writes will do, so a
        # promoted standby is found by the next connection without a restart.
        kwargs["host"] = ",".join(host for host, _ in addresses)
        kwargs["port"] = ",".join(str(port or 5432) for _, port in addresses)
        kwargs["target_session_attrs"] = "read-write"
    kwargs.update(options)
    name = unquote(parts.path.lstrip("/"))
    # s to wait for the server to accept a new connection: an unreachable database is
    # then a call's UNAVAILABLE within the deadline, not a thread stuck for minutes.
    connect = CONNECT_TIMEOUT_SECONDS if timeout is None else max(2, math.ceil(timeout))
    kwargs.setdefault("connect_timeout", connect)
    if scheme in ("postgres", "postgresql"):
        kwargs.setdefault("keepalives", 1)
        kwargs.setdefault("keepalives_idle", KEEPALIVE_IDLE_SECONDS)
        kwargs.setdefault("keepalives_interval", KEEPALIVE_INTERVAL_SECONDS)
        kwargs.setdefault("keepalives_count", KEEPALIVE_COUNT)
        kwargs.setdefault("tcp_user_timeout", TCP_USER_TIMEOUT_SECONDS * 1000)
        given = str(kwargs.get("options", ""))
        if timeout is not None and "statement_timeout" not in given:
            ours = f"-c statement_timeout={math.ceil(timeout * 1000)}"
            kwargs["options"] = f"{given} {ours}".strip()
        return PooledPostgresqlDatabase(name, field_types={"JSONTEXT": "TEXT"}, **kwargs)
    statement = kwargs.pop("max_statement_time", timeout)
    sync_wait = kwargs.pop("wsrep_sync_wait", None)
    if timeout is not None:
        kwargs.setdefault("read_timeout", timeout)
        kwargs.setdefault("write_timeout", timeout)
    for seconds in ("connect_timeout", "read_timeout", "write_timeout"):  # pymysql wants numbers
        if isinstance(kwargs.get(seconds), str):
            kwargs[seconds] = float(str(kwargs[seconds]))
    kwargs.setdefault("charset", "utf8mb4")
    # A call reads one snapshot (Store.read); only REPEATABLE READ gives one, and a
    # server configured for READ COMMITTED (as Django suggests) would not.
    kwargs.setdefault("init_command", "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    pool = PooledMySQLClientDatabase if driver == "mysqlclient" else PooledMySQLDatabase
    return pool(
        name,
        field_types={"JSONTEXT": "LONGTEXT"},
        statement_timeout=float(str(statement)) if statement else None,
        addresses=tuple((host, port or 3306) for host, port in addresses) if several else (),
        wsrep_sync_wait=int(str(sync_wait)) if sync_wait is not None else None,
        **kwargs,
    )


def ensure_schema(db: Database) -> bool:
    """Create or upgrade the schema; True if anything was applied.

    Refuses (migrations.SchemaTooNew) a database written by a newer release.
    """
    with db.connection_context():
        return bool(migrate(db))

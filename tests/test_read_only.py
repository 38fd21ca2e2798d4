"""A database the service only reads (a bk-sops deployment's) is opened so it cannot write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import peewee
import pytest

from server.db.connection import DatabaseURLError
from server.db.connection import open_read_only


def _rollback_journal_file(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=delete")
        conn.execute("CREATE TABLE eri_state (node_id TEXT)")
        conn.execute("INSERT INTO eri_state VALUES ('node1')")
    conn.close()


def test_sqlite_is_read_in_its_own_journal_mode_and_never_written(tmp_path: Path) -> None:
    path = tmp_path / "engine.db"
    _rollback_journal_file(path)
    db = open_read_only(f"sqlite:///{path}")
    db.connect()
    try:
        assert db.execute_sql("SELECT node_id FROM eri_state").fetchall() == [("node1",)]
        assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "delete"
        with pytest.raises(peewee.OperationalError, match="readonly"):
            db.execute_sql("INSERT INTO eri_state VALUES ('node2')")
    finally:
        db.close()
    assert not (tmp_path / "engine.db-wal").exists()


def test_a_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(DatabaseURLError, match="no such file"):
        open_read_only(f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()

"""The harness can run the engine while the service's driver reads the same database."""

from __future__ import annotations

import time
from pathlib import Path

from peewee import MySQLDatabase

from tests.engine.harness import open_reader
from tests.engine.harness import writing_pipelines

#: Passes of the engine's loop; each is a few transactions (state, data, history, context).
PASSES = 30


def test_a_reader_sees_the_engine_write(
    database_url: str, engine_venv: Path, tmp_path: Path
) -> None:
    """Reads of a looping node's state, while the engine loops it, see it move pass by pass."""
    seen: list[tuple[str, int]] = []
    with writing_pipelines(database_url, tmp_path, PASSES) as (manifest, process):
        body = manifest["pipelines"]["long_loop"]["nodes"]["body"]["id"]
        db = open_reader(database_url)
        quote = "`" if isinstance(db, MySQLDatabase) else '"'
        sql = f"SELECT name, {quote}loop{quote} FROM eri_state WHERE node_id = {db.param}"
        while process.poll() is None:
            with db.connection_context():
                row = db.execute_sql(sql, (body,)).fetchone()
            if row is not None and (not seen or seen[-1] != tuple(row)):
                seen.append(tuple(row))
            time.sleep(0.002)  # a polling interval: reading flat out starves the engine 3x
        with db.connection_context():
            final = tuple(db.execute_sql(sql, (body,)).fetchone())
    assert final == ("FINISHED", PASSES)
    loops = [loop for _, loop in seen]
    assert loops == sorted(loops)
    assert len(set(loops)) >= 2, f"no pass seen while the engine wrote: {seen}"
